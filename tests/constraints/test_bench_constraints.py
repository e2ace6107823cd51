"""bench/constraints.py runs in its --quick mode (timings are not checked), prints its
table, says why the peers' row is skipped, and leaves bench/RESULTS.md alone."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_constraints_bench_quick():
    results = (BENCH / "RESULTS.md").read_bytes()
    proc = subprocess.run([sys.executable, str(BENCH / "constraints.py"), "--quick",
                           "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Constrained SMC" in proc.stdout and "|---|" in proc.stdout
    assert "genlm-control" in proc.stdout
    assert "| SMC, constraints={'x': Regex} |" in proc.stdout
    assert (BENCH / "RESULTS.md").read_bytes() == results
