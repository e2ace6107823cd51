"""bench/objectives.py runs in its --quick mode (timings are not checked): it prints its
tables and verdicts against the current API and leaves bench/RESULTS.md alone."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_objectives_quick_run(tmp_path):
    results = (BENCH / "RESULTS.md").read_bytes()
    plot = tmp_path / "objectives.png"
    proc = subprocess.run([sys.executable, str(BENCH / "objectives.py"), "--quick",
                           "--plot", str(plot)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in ("| TB(+SMC replay) |", "| SubTB(+SMC replay) |", "| SubTB |",
                 "| DPG(smc) less SMC.run |", "DPG(smc) exact KL(p*‖q)", "SubTB exact KL(q‖p*)",
                 "|---|"):
        assert text in proc.stdout, text
    assert plot.stat().st_size > 1000  # a PNG was written
    assert (BENCH / "RESULTS.md").read_bytes() == results
