"""Every benchmark that needs only the dev install runs in its ``--quick`` mode.

The timings are not checked (a timing never decides a test); what is checked is that
each script still runs against the current API, prints its table, and, as
``bench/README.md`` promises for ``--quick``, leaves ``bench/RESULTS.md`` alone.
``peers_rl.py`` and ``peers_smc.py`` need TRL and the SMC peers, which ``make test``
does not install.
"""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

#: script -> text its quick run prints with its table
SCRIPTS = {
    "sampling.py": "## Sampling and log_prob",
    "smc.py": "## Token-level SMC",
    "dpg.py": "DPG reaches exact KL(p*‖q)",
    "svi.py": "## SequenceELBO: SVI step vs hand-written RLOO",
}


#: scripts whose quick run is part of their feature's tests: script -> that test file
RUN_ELSEWHERE = {
    "constraints.py": "tests/constraints/test_bench_constraints.py",
    "distributed.py": "tests/test_distributed.py",
    "objectives.py": "tests/test_bench_objectives.py",
    "scaling.py": "tests/test_bench_scaling.py",
}


def test_every_script_needing_only_dev_is_listed():
    peers = {"peers_rl.py", "peers_smc.py"}
    helpers = {"common.py", "floors.py", "task.py", "run_all.py"}
    scripts = {p.name for p in BENCH.glob("*.py")} - peers - helpers
    assert scripts - set(RUN_ELSEWHERE) == set(SCRIPTS)
    for script, test_file in RUN_ELSEWHERE.items():
        path = BENCH.parent / test_file
        assert path.exists() and script in path.read_text(), f"{test_file} must run {script}"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_quick_run(script):
    results = (BENCH / "RESULTS.md").read_bytes()
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SCRIPTS[script] in proc.stdout
    assert "|---|" in proc.stdout  # a markdown table
    assert (BENCH / "RESULTS.md").read_bytes() == results


def test_device_script_carries_the_pinned_versions():
    """``bench/device.sh`` carries to the GPU machine the packages of
    ``bench/device-wheels.txt``: each must be pinned at its ``constraints.txt`` version (the
    versions CI tests), and the script must parse."""
    pins = {}
    for line in (BENCH.parent / "constraints.txt").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    wheels = [line.strip() for line in (BENCH / "device-wheels.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert wheels
    for spec in wheels:
        name, version = spec.split("==")
        assert name != "torch", "the GPU machine keeps its own CUDA torch"
        assert pins.get(name.lower().replace("_", "-")) == version, spec
    subprocess.run(["bash", "-n", str(BENCH / "device.sh")], check=True)
