"""train.tensorboard: the event files hold the numbers of metrics.jsonl, once each, also after a resume."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dho_pipeline.cli import main
from dho_pipeline.tensorboard_log import scalars
from tests.conftest import one_line_error
from tests.test_stage_two import train_config


def test_tensorboard_scalars_equal_metrics_jsonl_after_resuming_from_an_older_checkpoint(
        cached_store, shards_dir, teacher_file, tmp_path):
    config = str(train_config(tmp_path, shards_dir, teacher_file, cached_store, steps=8, tensorboard=True))
    run = tmp_path / "run"

    def train(*args: str) -> None:
        result = CliRunner().invoke(main, ["train-student", "-c", config, *args])
        assert result.exit_code == 0, result.output

    train("--max-steps", "4")
    shutil.copy(run / "last.pt", tmp_path / "step-4.pt")
    train("--resume")
    # as if killed after logging steps 6 and 8 but before any checkpoint past step 4
    shutil.copy(tmp_path / "step-4.pt", run / "last.pt")
    train("--resume")

    expected: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for tag, value in scalars(record):
            expected.setdefault(tag, []).append((record["step"], value))
    events = EventAccumulator(str(run))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(expected) and "val/combined" in expected
    for tag, points in expected.items():
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [step for step, _ in logged] == [step for step, _ in points], tag
        assert [value for _, value in logged] == pytest.approx([value for _, value in points], rel=1e-6), tag
    assert [step for step, _ in expected["train/loss"]] == [2, 4, 6, 8]


def test_tensorboard_without_its_package_is_one_line_naming_the_extra(cached_store, shards_dir, teacher_file,
                                                                       tmp_path, monkeypatch):
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store, steps=2, tensorboard=True)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    result = CliRunner().invoke(main, ["train-student", "-c", str(config)])
    one_line_error(result, "train.tensorboard", "pip install -e '.[tensorboard]'")
    assert not (tmp_path / "run").exists()
