"""Start-up time and memory of the `mergekit-ext` commands (issue 14, item 3).

Each command runs as a fresh subprocess, the way a user starts it; wall time and
peak RSS (``resource.getrusage(RUSAGE_CHILDREN)``) are reported as the median of
``--repeat`` runs, plus the top imports from ``python -X importtime``.

    python benchmarks/startup.py [--repeat 5] [--importtime]

Goals: ``--help``, ``--version``, ``methods`` and the ``show`` commands under 1 s
and 100 MB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMANDS = (
    ["--help"],
    ["--version"],
    ["methods"],
    ["eval", "--help"],
    ["adarank", "show", "--help"],
    ["continual", "show", "--help"],
    ["merge", "--help"],  # mergekit's options from a stored table: no torch
)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def measure(args, repeat: int):
    """(median seconds, max peak RSS in MB) of ``python -m mergekit_ext.cli ARGS``."""
    times, peaks = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-c", "from mergekit_ext.cli import main; main()", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_env(),
        )
        _, status, usage = os.wait4(process.pid, 0)
        times.append(time.perf_counter() - start)
        peaks.append(usage.ru_maxrss / 1024)  # KB on Linux
    return statistics.median(times), max(peaks)


def top_imports(args, count: int = 8):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "from mergekit_ext.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=_env(),
    )
    rows = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            parts = line.split("|")
            rows.append((int(parts[1]), parts[2].strip()))
    return sorted(rows, reverse=True)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--importtime", action="store_true", help="also list the slowest imports per command")
    options = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, median of {options.repeat} runs")
    print(f"{'command':<28} {'wall s':>8} {'peak MB':>8}")
    for args in COMMANDS:
        seconds, peak = measure(args, options.repeat)
        print(f"{'mergekit-ext ' + ' '.join(args):<28} {seconds:>8.2f} {peak:>8.0f}")
        if options.importtime:
            for cumulative, name in top_imports(args):
                print(f"    {cumulative / 1e6:7.3f} s  {name}")


if __name__ == "__main__":
    main()
