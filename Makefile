# Two commands on a fresh clone: `make demo` and `make test`.
# Each creates .venv if it is missing and installs the pinned versions first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test bench bench-peers lint models install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) constraints.txt pyproject.toml
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[dev,lora]"
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PIP) -e ".[dev,lora,bench]"
	touch $(BENCH_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(BENCH_STAMP)
	$(PY) bench/run_all.py

# The SMC peers (hfppl, genlm-control) conflict with each other's backends and pull
# ~60 packages, so they live in their own venv; bench/run_all.py uses it when present.
PEERS := .venv-peers
PEERS_PIP := $(PEERS)/bin/python -m pip install --disable-pip-version-check -q -c bench/constraints-peers.txt
bench-peers: $(BENCH_STAMP)
	test -d $(PEERS) || $(PYTHON) -m venv $(PEERS)
	$(PEERS_PIP) "torch==2.13.0"
	$(PEERS_PIP) -e . genlm-control==0.4.1
	$(PEERS_PIP) --no-deps hfppl==0.1.2
	$(PEERS)/bin/python -m pip install -q --no-deps --target $(PEERS)/hfppl-backend genlm-backend==0.0.2
	echo "$(CURDIR)/$(PEERS)/hfppl-backend" > $$($(PEERS)/bin/python -c "import site; print(site.getsitepackages()[0])")/hfppl-backend.pth
	$(PEERS)/bin/python bench/peers_smc.py

lint: $(STAMP)
	$(PY) -m ruff check pyro_lm tests examples bench models

models: $(STAMP)
	$(PY) models/build_tinylm.py --out models/tinylm
	$(PY) models/build_tinylm.py --tokenizer bpe --out models/tinylm-bpe

clean:
	rm -rf $(VENV) out .pytest_cache
