"""Shared benchmark helpers: argument parsing, machine description, interleaved timing,
RESULTS.md sections."""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def base_parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--repeats`` (timed calls per contender),
    ``--threads`` (torch threads) and ``--quick`` (a smoke run of a few seconds that
    leaves RESULTS.md alone; each script says what it shrinks)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true",
                   help="a few seconds: fewer repeats, RESULTS.md left alone")
    return p


def machine() -> str:
    """One line naming the machine the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {torch.get_num_threads()} threads{dev}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int = 7, warmup: int = 2, device="cpu") -> dict:
    """Median seconds per call of each function, calls alternating between functions
    so that drifts in machine load hit every contender alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def write_section(name: str, body: str) -> None:
    """Replace (or append) the ``<!-- bench:NAME -->`` section of bench/RESULTS.md."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = RESULTS.read_text() if RESULTS.exists() else (
        "# Benchmark results\n\nEach section is written by the script named in it; "
        "rerun the command to refresh it.\n\n")
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + \
        "\n\n" + block + "\n"
    RESULTS.write_text(text)


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
