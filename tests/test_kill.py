"""Kill -9 at any moment, rerun: the result equals an uninterrupted run (stage one's store, stage two's student).

Real subprocesses of the real CLI, through benchmarks/kill_trials.py (run it for more trials). Each stage gets
two seeded kills: one in the first 100 ms after its first write (store creation, the run folder), one within
the first half of the reference run's writes, so that it lands before the command ends even on a busy machine.
"""

from __future__ import annotations

import pytest

from benchmarks.kill_trials import Setup, ensure_reference, kill_delays, make_setup, run_trials

pytestmark = pytest.mark.reliability
TRIALS = 2  # each costs two process starts, seconds of imports apiece


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return make_setup(tmp_path_factory.mktemp("kill-trials"))


@pytest.mark.parametrize("stage", ["cache-teacher", "train-student"])
def test_a_stage_killed_at_a_random_moment_and_rerun_equals_an_uninterrupted_run(setup, stage):
    ensure_reference(stage, setup)
    lines: list[str] = []
    delays = kill_delays(TRIALS, setup.duration_s[stage], seed=0, span=0.5)
    trials = run_trials(stage, setup, delays, jobs=2, log=lines.append)
    assert all(t.killed for t in trials), "\n".join(lines)
    assert all(t.identical for t in trials), "\n".join(lines)
