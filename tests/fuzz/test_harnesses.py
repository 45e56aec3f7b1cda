"""CI's bounded fuzz run: every harness, a few thousand executions or a few seconds each, must exit 0.

Budget: seven harnesses, each at most ``SECONDS`` of fuzzing after its start-up
(a PKI, an app, the seed corpus), about two minutes together. The long run is
``python -m tests.fuzz run`` (10^6 executions each; see README.md).
"""

from __future__ import annotations

import pytest

from . import HARNESSES
from .__main__ import run_harness

RUNS = 3000
SECONDS = 8


@pytest.mark.fuzz
@pytest.mark.parametrize("name", HARNESSES)
def test_harness_finds_nothing_in_a_bounded_run(name, tmp_path):
    outcome = run_harness(name, RUNS, SECONDS, tmp_path)
    log = (tmp_path / f"{name}.log").read_text(errors="replace")
    assert outcome.returncode == 0, f"{name}: {outcome.crash or 'failed'}\n{log[-6000:]}"
    assert outcome.executions >= 100 and outcome.coverage > 0, log[-3000:]  # it really fuzzed, with coverage feedback
