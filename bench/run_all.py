"""Run every benchmark script in bench/ in sequence, with its default arguments.

    python bench/run_all.py [--quick] [--only NAME ...]

A benchmark script is a ``bench/*.py`` file with a ``__main__`` block (helpers such
as common.py and floors.py have none). Each runs in its own process, one after
another, so that no two compete for the cores; each updates its own section of
bench/RESULTS.md (not with ``--quick``). ``peers_smc.py`` needs the SMC peers,
which live in ``.venv-peers`` (see bench/README.md): it runs under
``.venv-peers/bin/python`` when that exists, else under this interpreter (its peer
rows then say why they were not run). A failing script does not stop the others;
the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
#: scripts that need the peers' environment
NEEDS_PEERS = {"peers_smc.py"}


def scripts() -> list[Path]:
    return sorted(p for p in BENCH.glob("*.py")
                  if p.name != Path(__file__).name and "__main__" in p.read_text())


def interpreter(script: Path) -> str:
    if script.name in NEEDS_PEERS and PEERS_PYTHON.exists():
        return str(PEERS_PYTHON)
    return sys.executable


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every script")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="run only these scripts (e.g. peers_rl or peers_rl.py)")
    args = p.parse_args(argv)
    todo = scripts()
    if args.only:
        wanted = {name if name.endswith(".py") else name + ".py" for name in args.only}
        unknown = wanted - {s.name for s in todo}
        if unknown:
            p.error(f"--only: no benchmark script named {sorted(unknown)}; "
                    f"choose from {[s.name for s in todo]}")
        todo = [s for s in todo if s.name in wanted]
    failed = []
    for script in todo:
        cmd = [interpreter(script), str(script.relative_to(ROOT))] + \
            (["--quick"] if args.quick else [])
        print(f"\n=== {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT)
        print(f"=== {script.name}: exit {rc} after {time.perf_counter() - start:.0f} s",
              flush=True)
        if rc != 0:
            failed.append(script.name)
    if failed:
        print(f"\nFailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"\nAll {len(todo)} benchmark scripts ran; results in bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
