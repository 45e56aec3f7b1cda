"""Run the fuzz harnesses: ``python -m tests.fuzz run [--runs N] [--max-total-time S] [HARNESS...]``.

Each harness runs in its own process (libFuzzer owns the process), one after
another, niced; the summary gives executions, coverage (cov: edges, ft:
features) and the outcome per harness. A failing input is written to the
work directory as ``<harness>-crash-<sha1>``; the exit status is 1 if any
harness failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import HARNESSES, WORK
from .deployment import scratch_parent

ROOT = Path(__file__).resolve().parents[2]
_PROGRESS = re.compile(rb"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)", re.M)


@dataclass
class Outcome:
    harness: str
    returncode: int
    executions: int
    coverage: int
    features: int
    seconds: float
    crash: str


def run_harness(name: str, runs: int, max_total_time: int, work: Path = WORK) -> Outcome:
    """Run one harness in its own process; its output goes to ``work/<name>.log``."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{name}.log"
    command = [
        sys.executable, "-m", f"tests.fuzz.{name}", f"-runs={runs}", f"-max_total_time={max_total_time}",
        f"-artifact_prefix={work}/{name}-", "-timeout=60", "-print_final_stats=1",
    ]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"est-fuzz-{name}-", dir=scratch_parent()) as deployment, log.open("wb") as out:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "EST_FUZZ_WORK": str(work), "EST_FUZZ_DEPLOYMENT": deployment}
        result = subprocess.run(["nice", *command], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    text = log.read_bytes()
    progress = _PROGRESS.findall(text)
    executions, coverage, features = map(int, progress[-1]) if progress else (0, 0, 0)
    stat = re.search(rb"stat::number_of_executed_units: (\d+)", text)
    executions = int(stat.group(1)) if stat else executions
    crash = re.search(rb"Test unit written to (\S+)", text)
    return Outcome(name, result.returncode, executions, coverage, features, time.monotonic() - started, crash.group(1).decode() if crash else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run harnesses for a bounded number of executions")
    run.add_argument("harnesses", nargs="*", choices=[[], *HARNESSES], default=[], metavar="HARNESS", help=", ".join(HARNESSES))
    run.add_argument("--runs", type=int, default=1_000_000, help="mutations per harness after the seed corpus (default 10^6)")
    run.add_argument("--max-total-time", type=int, default=0, help="seconds per harness, 0 for no limit")
    args = parser.parse_args(argv)

    outcomes = []
    for name in args.harnesses or HARNESSES:
        outcome = run_harness(name, args.runs, args.max_total_time)
        outcomes.append(outcome)
        state = "ok" if outcome.returncode == 0 else f"FAILED ({outcome.crash or f'exit {outcome.returncode}'}; log {WORK / (name + '.log')})"
        print(f"{name:14} executions {outcome.executions:>9}  cov {outcome.coverage:>5}  ft {outcome.features:>5}  {outcome.seconds:7.0f} s  {state}", flush=True)
    return 0 if all(o.returncode == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
