# Two commands on a fresh clone: `make demo` and `make test`.
# Each creates .venv if it is missing and installs the pinned versions first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test bench lint models install clean

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

lint: $(STAMP)
	$(PY) -m ruff check pyro_lm tests examples bench models

models: $(STAMP)
	$(PY) models/build_tinylm.py --out models/tinylm

clean:
	rm -rf $(VENV) out .pytest_cache
