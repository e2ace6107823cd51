#!/usr/bin/env bash
# The GPU checks as one prepared run: the CUDA test cases, then bench/sampling.py and
# bench/smc.py on cuda (their RESULTS.md sections are named for the device, so the CPU
# figures stay). Made for a machine with no network whose python3 holds a CUDA torch
# and most of the stack (transformers, peft, numpyro, jax, xarray, pandas, scipy,
# pytest, hypothesis), with what it lacks carried as wheels in .whl/ (ignored by git):
#
#   bench/device.sh fetch     # here, with network: the wheels of bench/device-wheels.txt
#   bench/device.sh run       # there, from the repository root; results under $OUT
#
# `run` keeps every stage inside its own time limit (STAGE_TESTS, STAGE_SAMPLING,
# STAGE_SMC seconds), so that the whole run ends well inside 10 minutes; each stage's
# output goes to $OUT as it is printed, with bench/RESULTS.md at the end. PY names the
# interpreter (default python3), DEVICE the device (default cuda; `DEVICE=cpu
# bench/device.sh run` rehearses the run here, the CUDA tests then skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/device-wheels.txt
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-out/device}

fetch() {
    mkdir -p .whl
    grep -v '^#' "$WHEELS" | while read -r spec; do
        [ -n "$spec" ] || continue
        # pure-Python wheels and abi3 builds for the Python 3.12 there (llguidance needs
        # glibc 2.31); no dependencies: the list names every one the machine lacks
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_31_x86_64 \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .whl "$spec" || exit 1
    done
    ls -l .whl
}

stage() {  # stage NAME SECONDS COMMAND...: run it under a limit, output to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    tail -n 25 "$OUT/$name.txt"
}

run() {
    mkdir -p "$OUT"
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    "$PY" - <<'EOF' 2>&1 | tee "$OUT/versions.txt" || exit 1
import arviz, llguidance, peft, pyro, torch, transformers
import pyro_lm
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"{gpu}; torch {torch.__version__}, transformers {transformers.__version__}, "
      f"pyro {pyro.__version__}, peft {peft.__version__}, arviz {arviz.__version__}, "
      f"llguidance {llguidance.__version__}")
EOF
    stage cuda_tests "${STAGE_TESTS:-200}" "$PY" -m pytest -q -p no:cacheprovider -k cuda tests
    stage sampling "${STAGE_SAMPLING:-100}" "$PY" bench/sampling.py --device "$DEVICE"
    stage smc "${STAGE_SMC:-260}" "$PY" bench/smc.py --device "$DEVICE" --repeats 3 \
        --ess-runs 5
    cp bench/RESULTS.md "$OUT/RESULTS.md"
}

case "${1:-}" in
    fetch) fetch ;;
    run) run ;;
    *) echo "usage: bench/device.sh fetch|run" >&2; exit 2 ;;
esac
