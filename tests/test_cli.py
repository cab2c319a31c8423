"""The `dho` command line: it lists its commands and turns bad input into one line naming what is wrong."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dho_pipeline.cli import main
from stages import demo
from stages.train_student import TrainingStopped
from tests.conftest import one_line_error


def test_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("make-shards", "cache-teacher", "cache", "fit-adapter", "train-student", "evaluate", "predict",
                    "export", "plot", "demo"):
        assert f"  {command} " in result.output, command
    cache = CliRunner().invoke(main, ["cache", "--help"])
    assert "inspect" in cache.output and "list" in cache.output


def sigterm() -> None:
    signal.raise_signal(signal.SIGTERM)  # as `kill` or a scheduler's time limit sends it


def raising(stop: BaseException) -> Callable[[], None]:
    def stopped() -> None:
        raise stop
    return stopped


@pytest.mark.parametrize(("stop", "number", "says"), [
    (raising(TrainingStopped("stopped at step 3: last.pt kept", signal.SIGINT)), signal.SIGINT,
     "stopped at step 3: last.pt kept"),  # in a run
    (raising(KeyboardInterrupt()), signal.SIGINT, "demo stopped (Ctrl-C)"),  # between runs: make-shards, ...
    (sigterm, signal.SIGTERM, "demo stopped (SIGTERM)"),
])
def test_a_stopped_demo_says_how_to_continue_it(stop, number, says, tmp_path, monkeypatch, sigterm_not_taken):
    monkeypatch.setattr(demo, "run", lambda *_args, **_kwargs: stop())
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(tmp_path / "my out")])
    assert result.exit_code == 128 + number, result.output
    assert result.stderr == f"{says}; continue with dho demo --out '{tmp_path}/my out' --quick\n"
    assert signal.getsignal(signal.SIGTERM) is sigterm_not_taken  # the demo's handler went with it


def test_a_bad_config_value_names_the_field_in_one_line(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text("views:\n  count: 0\n")
    result = CliRunner().invoke(main, ["cache-teacher", "-c", str(config)])
    assert result.exit_code == 2 and "views.count" in result.output and "Traceback" not in result.output


def test_a_missing_shard_folder_is_named(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(f"data:\n  shards: {tmp_path / 'nowhere'}\n")
    result = CliRunner().invoke(main, ["train-student", "-c", str(config)])
    assert result.exit_code == 1 and "nowhere/manifest.json not found" in result.output


def test_demo_without_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "FASHION_MNIST_DIR", tmp_path / "absent")
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "apt-get install dataset-fashion-mnist" in result.output
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback_the_one_line_error_hides(tmp_path, monkeypatch):
    config = tmp_path / "p.yaml"
    config.write_text(f"data:\n  shards: {tmp_path / 'nowhere'}\n")
    quiet = CliRunner().invoke(main, ["train-student", "-c", str(config)])
    assert quiet.exit_code == 1 and isinstance(quiet.exception, SystemExit)
    for args, env in ((["--debug"], {}), ([], {"DHO_DEBUG": "1"})):
        loud = CliRunner().invoke(main, [*args, "train-student", "-c", str(config)], env=env)
        assert isinstance(loud.exception, FileNotFoundError) and "nowhere/manifest.json" in str(loud.exception)


def test_a_run_with_no_steps_is_refused_before_it_writes_anything(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(f"train:\n  out_dir: {tmp_path / 'run'}\n")
    for override, field in (("train.steps=-5", "train.steps"), ("train.epochs=0", "train.epochs")):
        result = CliRunner().invoke(main, ["train-student", "-c", str(config), "--set", override])
        assert result.exit_code == 2 and field in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_a_device_torch_does_not_know_or_have_is_one_line_naming_where_it_came_from(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    checkpoint = tmp_path / "final.pt"
    checkpoint.write_bytes(b"")
    for device, says in (("gpu", "must be one of auto, cpu, cuda, cuda:N, xpu, xpu:N or mps, got 'gpu'"),
                         ("cuda", "cuda, but torch sees no GPU")):
        one_line_error(CliRunner().invoke(main, ["evaluate", str(checkpoint), "--device", device]), f"--device: {says}")
    config = tmp_path / "p.yaml"
    config.write_text("train:\n  device: cuda:1\n")
    one_line_error(CliRunner().invoke(main, ["cache-teacher", "-c", str(config)]),
                   "train.device: cuda:1, but torch sees no GPU")


def test_a_config_error_is_prefixed_once_by_where_the_value_came_from(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text("train:\n  lr: 1\n  out_dir: x: y\n")
    result = CliRunner().invoke(main, ["train-student", "-c", str(config)])
    assert f"Error: {config}, line 3, column 13: not valid YAML: mapping values are not allowed here\n" in result.output
    config.write_text("train:\n  lr: 1\n")
    result = CliRunner().invoke(main, ["train-student", "-c", str(config), "--set", "train.stpes=3"])
    assert "Error: --set train.stpes=3: unknown field (did you mean train.steps? known: " in result.output
    assert str(config) not in result.output


def test_the_command_that_continues_a_stopped_run_is_the_launch_it_needs(monkeypatch):
    from dho_pipeline.cli import _command_line

    args = ("train-student", Path("p.yaml"), ("train.lr=0.1",), "--resume")
    assert _command_line(*args) == "dho train-student -c p.yaml --set train.lr=0.1 --resume"
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun on one node: last.pt holds 4 ranks' states
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert _command_line(*args) == ("torchrun --nproc_per_node 4 -m dho_pipeline.cli train-student -c p.yaml "
                                      "--set train.lr=0.1 --resume")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two nodes
    assert _command_line(*args) == ("the same torchrun launch (4 processes) of dho_pipeline.cli train-student "
                                      "-c p.yaml --set train.lr=0.1 --resume")
