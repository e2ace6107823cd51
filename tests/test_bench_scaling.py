"""bench/scaling.py runs in its --quick mode, prints its three tables and leaves RESULTS.md alone
(the timings are not checked: a timing never decides a test)."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_scaling_quick_run():
    results = (BENCH / "RESULTS.md").read_bytes()
    proc = subprocess.run([sys.executable, str(BENCH / "scaling.py"), "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "## Scaling" in out
    assert sum(line.startswith("|---|") for line in out.splitlines()) == 3  # three tables
    for case in ("GPT-2 2x64 V64", "Llama 2x64 V512", "no gradient", "forward + backward",
                 "forward + backward, checkpointed"):
        assert case in out
    assert (BENCH / "RESULTS.md").read_bytes() == results
