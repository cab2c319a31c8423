"""Reliability of stage two and its readers: a damaged checkpoint, a full disk, a cut-off metrics line, a
diverging loss and a file that is not an image, each reported in one line naming the file, step or shard."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
from click.testing import CliRunner, Result

from dho_pipeline.cli import main
from dho_pipeline.config import load_config
from dho_pipeline.data.shards import ShardDataError, load_manifest
from dho_pipeline.data.student_stream import StreamSpec, StudentStream
from dho_pipeline.errors import CheckpointError, DiskFull
from dho_pipeline.metrics_log import MetricsLog
from dho_pipeline.student.checkpoint import load_checkpoint, save_checkpoint
from dho_pipeline.student.from_checkpoint import load_student
from stages import train_student
from tests.conftest import RunsCodeOnLoad, one_line_error, resize_tmpfs, tmpfs, write_config

pytestmark = pytest.mark.reliability

STUDENT = {"model": "resnet10t", "image_size": 32}
BATCH_LABELLED, BATCH_UNLABELLED = 8, 16


def train_config(tmp_path: Path, shards_dir: Path, teacher_file: Path, store: Path, name: str = "run",
                 **train) -> Path:
    values = {"steps": 8, "batch_labelled": BATCH_LABELLED, "batch_unlabelled": BATCH_UNLABELLED, "log_every": 2,
              "checkpoint_every": 4, "out_dir": str(tmp_path / name), "lr": 2e-3}
    values.update(train)
    return write_config(tmp_path / f"{name}.yaml", shards_dir, teacher_file, student=STUDENT, train=values,
                        cache={"store": str(store)})


@pytest.fixture(scope="module")
def uninterrupted(cached_store, shards_dir, teacher_file, tmp_path_factory) -> Path:
    """The run folder of 8 steps trained in one go: the reference for interrupted runs."""
    config = train_config(tmp_path_factory.mktemp("uninterrupted"), shards_dir, teacher_file, cached_store)
    result = train(config)
    assert result.exit_code == 0, result.output
    return Path(load_config(config).train.out_dir)


def train(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["train-student", "-c", str(config), *args])


def metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def image_file(fmnist, tmp_path) -> Path:
    path = tmp_path / "shoe.png"
    path.write_bytes(fmnist.read(("test", 0))[0])
    return path


@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize(("damage", "says"), [
    ("text", "not a readable checkpoint"),
    ("truncated", "not a readable checkpoint"),
    ("state dict", "not a train-student checkpoint (it lacks model, optimizer"),
    ("last.pt", "a training checkpoint, without the alpha and beta a finished run picks on val: use the "
                "run's final.pt (/"),  # its path follows
    ("runs code", "refused: loading it would call posix.mkdir"),
    ("other classes", "its weights do not fit the timm resnet10t student it names, with 5 classes (size mismatch for "
                      "ce_head.weight"),
])
def test_a_file_that_is_not_a_checkpoint_is_named_in_one_line(command, damage, says, uninterrupted, teacher_file,
                                                              image_file, tmp_path):
    bad = tmp_path / "final.pt"
    if damage == "text":
        bad.write_text("accuracy 0.83\n")
    elif damage == "truncated":
        whole = (uninterrupted / "final.pt").read_bytes()
        bad.write_bytes(whole[: len(whole) // 2])
    elif damage == "state dict":
        shutil.copy(teacher_file, bad)  # a model's state dict, saved by torch, is not a run's checkpoint
    elif damage == "other classes":  # as weights saved under a timm that named or shaped layers otherwise
        state = load_checkpoint(uninterrupted / "final.pt")
        torch.save({**state, "class_names": state["class_names"][:5]}, bad)
    elif damage == "runs code":
        torch.save({**load_checkpoint(uninterrupted / "final.pt"), "model": RunsCodeOnLoad(tmp_path / "ran")}, bad)
    else:
        bad = uninterrupted / "last.pt"
    images = [str(image_file)] if command == "predict" else []
    result = CliRunner().invoke(main, [command, str(bad), *images])
    one_line_error(result, str(bad), says)
    assert not (tmp_path / "ran").exists()


def test_the_last_pt_of_an_unfinished_run_is_refused_with_how_to_finish_it(uninterrupted, tmp_path):
    last = tmp_path / "stopped" / "last.pt"
    last.parent.mkdir()
    shutil.copy(uninterrupted / "last.pt", last)
    result = CliRunner().invoke(main, ["evaluate", str(last)])
    one_line_error(result, f"{last}: a training checkpoint,", "(this run has not finished: continue it "
                   "with --resume)")
    with pytest.raises(CheckpointError, match="this run has not finished"):  # from Python, by a str too
        load_student(str(last), torch.device("cpu"))


@pytest.mark.parametrize(("content", "says"), [
    (b"label: sneaker\n", "not an image"),
    ("half a png", "cannot decode image: image file is truncated"),
])
def test_predict_names_a_file_that_is_not_an_image(content, says, uninterrupted, image_file, tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_bytes(image_file.read_bytes()[:200] if content == "half a png" else content)
    result = CliRunner().invoke(main, ["predict", str(uninterrupted / "final.pt"), str(image_file), str(bad)])
    one_line_error(result, str(bad), says)


def test_a_full_disk_keeps_last_pt_and_the_resumed_run_matches(cached_store, shards_dir, teacher_file, uninterrupted,
                                                               tmp_path):
    checkpoint_bytes = (uninterrupted / "last.pt").stat().st_size
    # Room for the step-4 last.pt, not for the step-8 one beside it (written whole before the swap).
    with tmpfs(tmp_path / "disk", checkpoint_bytes * 3 // 2) as disk:
        run_dir = disk / "run"
        config = train_config(tmp_path, shards_dir, teacher_file, cached_store, out_dir=str(run_dir))
        message = one_line_error(train(config), f"{run_dir / 'last.pt'}: no space left on device")
        needed = float(re.search(r"needed about ([\d.]+) MiB", message)[1]) * 2**20
        assert needed == pytest.approx(checkpoint_bytes, rel=0.05)
        assert sorted(p.name for p in run_dir.iterdir()) == ["last.pt", "metrics.jsonl"]  # no last.pt.tmp left
        assert load_checkpoint(run_dir / "last.pt")["step"] == 4

        resize_tmpfs(disk, checkpoint_bytes * 4)
        resumed = train(config, "--resume")
        assert resumed.exit_code == 0, resumed.output
        assert metrics(run_dir) == metrics(uninterrupted)
        assert same_weights(run_dir / "final.pt", uninterrupted / "final.pt")


def test_resume_drops_a_cut_off_metrics_line_with_a_warning(cached_store, shards_dir, teacher_file, uninterrupted,
                                                            tmp_path):
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store)
    first = train(config, "--max-steps", "4")
    assert first.exit_code == 0, first.output
    log = tmp_path / "run" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    past_checkpoint = json.dumps({"step": 6, "epoch": 0.75, "loss": 1.0})  # written after last.pt: dropped silently
    log.write_text("\n".join([*lines, past_checkpoint]) + '\n{"step": 8, "epoch": 1.0, "lo')
    cut_off = len(lines) + 2

    resumed = train(config, "--resume")
    assert resumed.exit_code == 0, resumed.output
    warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and f"{log}:{cut_off}: dropped a line" in warnings[0], resumed.stderr
    assert metrics(tmp_path / "run") == metrics(uninterrupted)


def test_a_resume_that_runs_out_of_disk_rewriting_metrics_jsonl_keeps_every_line(tmp_path, monkeypatch):
    log = tmp_path / "run" / "metrics.jsonl"
    log.parent.mkdir()
    lines = [json.dumps({"step": step, "loss": 1.0 / step}) for step in (1, 2, 3)]
    log.write_text("".join(line + "\n" for line in lines))
    write_text = Path.write_text

    def disk_full_half_way(path: Path, text: str) -> int:
        write_text(path, text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full_half_way)
    with pytest.raises(DiskFull, match=str(log)):
        MetricsLog(log, resume_step=2, enabled=True)  # keeps steps 1 and 2
    monkeypatch.undo()
    assert log.read_text().splitlines() == lines and [p.name for p in log.parent.iterdir()] == [log.name]
    MetricsLog(log, resume_step=2, enabled=True)  # space freed
    assert log.read_text().splitlines() == lines[:2]


def batch_shards(shards_dir: Path, cached_store: Path, step: int) -> list[str]:
    """The shard files that step `step` (1-based) of a train_config run reads its rows from."""
    manifest = load_manifest(shards_dir)
    spec = StreamSpec(student_size=STUDENT["image_size"])
    rows = []
    for split, size in (("labelled", BATCH_LABELLED), ("unlabelled", BATCH_UNLABELLED)):
        stream = StudentStream(manifest.splits[split], str(cached_store), spec, size, start_batch=step - 1)
        rows += next(iter(stream))["row"].tolist()
    return [s.path.name for s in manifest.shards() if any(r in s.rows for r in rows)]


# At lr 1e9 the first bad loss is nan or inf, depending on the CPU's thread count (inf with one thread).
@pytest.mark.parametrize(("lr", "what"), [(1e9, r"the loss is -?(nan|inf)\b"), (1e5, "the weights are not finite")])
def test_a_diverging_run_stops_at_that_step_and_keeps_the_last_good_checkpoint(lr, what, cached_store, shards_dir,
                                                                               teacher_file, tmp_path):
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store, steps=6, checkpoint_every=1, log_every=1,
                          lr=lr)
    last = tmp_path / "run" / "last.pt"
    message = one_line_error(train(config), f"the last good checkpoint {last}")
    assert re.search(what, message), message
    step = int(re.match(r"step (\d+): ", message)[1])
    kept = load_checkpoint(last)
    assert kept["step"] == step - 1 and f"(step {step - 1}) is kept" in message
    assert all(t.isfinite().all() for t in kept["model"].values() if t.is_floating_point())
    assert f"(a batch from {', '.join(batch_shards(shards_dir, cached_store, step))})" in message
    assert not (tmp_path / "run" / "final.pt").exists()
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "run"))


def test_data_that_cannot_be_read_mid_run_keeps_the_last_step_and_the_resumed_run_matches(
        cached_store, shards_dir, teacher_file, uninterrupted, tmp_path, monkeypatch):
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store)
    calls, next_batch = [], train_student.StepFeed.next

    def unreadable_at_step_6(feed):
        calls.append(1)
        if len(calls) == 6:  # as a shard damaged after the up-front checks, or an image that does not decode
            raise ShardDataError("unlabelled-00002.tar: contents differ from the sha256 in manifest.json")
        return next_batch(feed)

    with monkeypatch.context() as patch:
        patch.setattr(train_student.StepFeed, "next", unreadable_at_step_6)
        failed = train(config)
    one_line_error(failed, "unlabelled-00002.tar: contents differ", "last.pt kept at step 5: once the data is "
                   "fixed, continue with train-student --resume")
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 5  # not 4, the last checkpoint_every
    assert train(config, "--resume").exit_code == 0
    assert same_weights(tmp_path / "run" / "final.pt", uninterrupted / "final.pt")
    assert metrics(tmp_path / "run") == metrics(uninterrupted)


def test_resume_with_another_number_of_processes_is_refused(cached_store, shards_dir, teacher_file, tmp_path):
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store)
    assert train(config, "--max-steps", "4").exit_code == 0
    last = tmp_path / "run" / "last.pt"
    state = load_checkpoint(last)
    state["rng"] = state["rng"] * 2  # as written by two torchrun ranks
    torch.save(state, last)
    one_line_error(train(config, "--resume"), str(last), "written by 2 process(es), resumed with 1")
    assert load_checkpoint(last)["step"] == 4


def test_evaluate_without_a_test_split_says_so(uninterrupted, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(load_checkpoint(uninterrupted / "final.pt")["shards"], shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["splits"]["test"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    final = load_checkpoint(uninterrupted / "final.pt")
    final["shards"] = str(shards)
    torch.save(final, tmp_path / "final.pt")
    one_line_error(CliRunner().invoke(main, ["evaluate", str(tmp_path / "final.pt")]), str(shards), "no test split")


def test_a_new_run_refuses_a_folder_that_holds_a_run_and_overwrite_starts_over(cached_store, shards_dir, teacher_file,
                                                                               uninterrupted, tmp_path):
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store)
    assert train(config, "--max-steps", "4").exit_code == 0
    run_dir = tmp_path / "run"
    (run_dir / "notes.txt").write_text("someone's notes")
    logged = (run_dir / "metrics.jsonl").read_text()

    one_line_error(train(config), f"{run_dir} holds a run (step 4 of 8): continue it with --resume, or start over "
                                  "with --overwrite, or choose another train.out_dir")
    assert (run_dir / "metrics.jsonl").read_text() == logged and load_checkpoint(run_dir / "last.pt")["step"] == 4
    assert train(config, "--resume", "--overwrite").exit_code == 2

    again = train(config, "--overwrite")
    assert again.exit_code == 0, again.output
    assert metrics(run_dir) == metrics(uninterrupted)
    assert same_weights(run_dir / "final.pt", uninterrupted / "final.pt")
    assert (run_dir / "notes.txt").read_text() == "someone's notes"  # not a file of the run: kept
    one_line_error(train(config), f"{run_dir} holds a run (step 8 of 8)")


def test_resume_refuses_settings_that_change_the_run_and_takes_those_that_do_not(cached_store, shards_dir,
                                                                                teacher_file, uninterrupted, tmp_path):
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store)
    assert train(config, "--max-steps", "4").exit_code == 0
    last = tmp_path / "run" / "last.pt"

    changed = train(config, "--resume", "--set", "train.method=ce_only", "--set", "train.lr=0.1",
                    "--set", "train.log_every=1")
    message = one_line_error(changed, str(last), "train.lr 0.002 -> 0.1", "train.method 'dho' -> 'ce_only'",
                             "--overwrite")
    assert "log_every" not in message
    one_line_error(train(config, "--resume", "--set", "train.steps=12"), "train.steps 8 -> 12")
    one_line_error(train(config, "--resume", "--set", "data.num_workers=1"), "data.num_workers 0 -> 1")
    assert load_checkpoint(last)["step"] == 4

    # When logs and checkpoints are written changes nothing the run computes.
    resumed = train(config, "--resume", "--set", "train.log_every=4", "--set", "train.checkpoint_every=3")
    assert resumed.exit_code == 0, resumed.output
    assert same_weights(tmp_path / "run" / "final.pt", uninterrupted / "final.pt")


class FailingAndStuckStream(StudentStream):
    """The labelled stream fails at its third batch; the unlabelled one hangs in a read from its third on."""

    def __iter__(self):
        for index, batch in enumerate(super().__iter__()):
            if index == 2 and self.batch_size == BATCH_LABELLED:
                raise OSError("a read failed")
            if index == 2:
                time.sleep(600)
            yield batch


def test_a_failed_run_leaves_no_loader_worker_behind_even_one_stuck_in_a_read(cached_store, shards_dir, teacher_file,
                                                                              tmp_path, monkeypatch):
    monkeypatch.setattr(train_student, "StudentStream", FailingAndStuckStream)
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store)
    with pytest.raises(OSError, match="a read failed") as failure:  # its traceback holds the loader iterators
        train_student.run(load_config(config, overrides=["data.num_workers=1"]))
    assert failure.value and not multiprocessing.active_children(), "workers ignore SIGTERM: they must be ended"


def test_a_last_pt_written_before_store_fingerprints_still_resumes(cached_store, shards_dir, teacher_file,
                                                                   uninterrupted, tmp_path):
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store)
    assert train(config, "--max-steps", "4").exit_code == 0
    last = tmp_path / "run" / "last.pt"
    state = load_checkpoint(last)
    del state["store_fingerprint"]  # as train-student wrote it before it kept the store's fingerprint
    torch.save(state, last)
    resumed = train(config, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert metrics(tmp_path / "run") == metrics(uninterrupted)


def test_resume_knows_the_teacher_by_its_contents_not_its_path(cached_store, shards_dir, teacher_file, uninterrupted,
                                                                tmp_path):
    moved = tmp_path / "elsewhere" / teacher_file.name  # as on another machine
    moved.parent.mkdir()
    shutil.copy(teacher_file, moved)
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store)
    assert train(config, "--max-steps", "4").exit_code == 0
    resumed = train(config, "--resume", "--set", f"teacher.pretrained={moved}")
    assert resumed.exit_code == 0, resumed.output
    assert same_weights(tmp_path / "run" / "final.pt", uninterrupted / "final.pt")

    # Online, the teacher runs every step: moved is taken, other weights at the same path are not.
    # Online, the teacher runs every step: moved or renamed is taken, and so is the dtype teacher.dtype auto
    # gave on another device (as a last.pt from a GPU says), but other weights at the same path are not.
    online = ["--set", "teacher.mode=online", "--set", "teacher.online_views=fresh", "--set", "train.out_dir=online"]
    assert train(config, *online, "--max-steps", "2").exit_code == 0
    last = tmp_path / "online" / "last.pt"
    state = load_checkpoint(last)
    assert state["online_teacher"]["dtype"] == "fp32"
    save_checkpoint(last, {**state, "online_teacher": {**state["online_teacher"], "dtype": "bf16"}})
    renamed = moved.with_name("renamed.pt")
    shutil.copy(moved, renamed)
    resumed = train(config, *online, "--max-steps", "2", "--resume", "--set", f"teacher.pretrained={renamed}")
    assert resumed.exit_code == 0, resumed.output
    torch.manual_seed(1)
    torch.save(open_clip.create_model("dho-tiny-clip").state_dict(), moved)
    refused = train(config, *online, "--resume", "--set", f"teacher.pretrained={moved}")
    one_line_error(refused, "the online teacher's checkpoint_sha256", "--overwrite")
    assert load_checkpoint(last)["step"] == 4


def test_resume_where_no_run_started_is_refused_and_a_run_killed_before_its_first_checkpoint_starts_over(
        cached_store, shards_dir, teacher_file, uninterrupted, tmp_path):
    typo = train_config(tmp_path, shards_dir, teacher_file, cached_store, out_dir=str(tmp_path / "rnu"))
    one_line_error(train(typo, "--resume"), f"--resume: no last.pt in {tmp_path / 'rnu'}: nothing to resume (drop "
                                            "--resume to start a new run)")
    assert not (tmp_path / "rnu").exists()

    config = train_config(tmp_path, shards_dir, teacher_file, cached_store)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")  # as a kill before step 4's checkpoint leaves it
    resumed = train(config, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "no last.pt in" in resumed.stderr and "starting at step 0" in resumed.stderr
    assert metrics(tmp_path / "run") == metrics(uninterrupted)


@pytest.mark.parametrize(("stop_signal", "workers"), [(signal.SIGINT, 0), (signal.SIGTERM, 1)])
def test_a_signal_stops_training_after_a_step_with_its_checkpoint_and_the_resumed_run_matches(
        stop_signal, workers, cached_store, shards_dir, teacher_file, tmp_path):
    settings = {"steps": 24, "log_every": 1, "checkpoint_every": 100}
    reference = train_config(tmp_path, shards_dir, teacher_file, cached_store, "reference", **settings)
    assert train(reference, "--set", f"data.num_workers={workers}").exit_code == 0
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store, **settings)
    run_dir = tmp_path / "run"

    # Ctrl-C and Slurm signal the whole process group: the loader workers too.
    process = subprocess.Popen([sys.executable, "-m", "dho_pipeline.cli", "train-student", "-c", str(config),
                                "--set", f"data.num_workers={workers}"],
                               cwd=Path(__file__).parents[1],
                               env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},  # as in here
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        log = run_dir / "metrics.jsonl"
        while process.poll() is None and not (log.exists() and len(log.read_text().splitlines()) >= 2):
            time.sleep(0.01)
        os.killpg(process.pid, stop_signal)
        stderr = process.communicate(timeout=120)[1]
    finally:  # a run that hangs must not outlive the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + stop_signal, stderr
    step = load_checkpoint(run_dir / "last.pt")["step"]
    assert 2 <= step < 24 and not (run_dir / "final.pt").exists()
    assert stderr.splitlines()[-1] == (f"stopped at step {step}: last.pt kept; continue with dho train-student -c "
                                       f"{config} --set data.num_workers={workers} --resume"), stderr

    resumed = train(config, "--set", f"data.num_workers={workers}", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert metrics(run_dir) == metrics(tmp_path / "reference")
    assert same_weights(run_dir / "final.pt", tmp_path / "reference" / "final.pt")


def shards_without(shards_dir: Path, split: str, out: Path) -> Path:
    """A copy of the test shards whose manifest lists no `split`."""
    shutil.copytree(shards_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["splits"][split]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_a_distilled_run_on_shards_without_an_unlabelled_split_is_refused_before_any_worker_starts(
        shards_dir, teacher_file, tmp_path):
    shards = shards_without(shards_dir, "unlabelled", tmp_path / "shards")
    config = train_config(tmp_path, shards, teacher_file, tmp_path / "no-store", steps=1)
    fresh = ["--set", "teacher.mode=online", "--set", "teacher.online_views=fresh"]  # no store needed
    refused = train(config, *fresh, "--set", "data.num_workers=2")  # it once started the labelled workers first
    one_line_error(refused, f"{shards} has no unlabelled split", "train.method dho", "ce_only")
    assert not multiprocessing.active_children()
    ce_only = train(config, *fresh, "--set", "train.method=ce_only")
    assert ce_only.exit_code == 0, ce_only.output


def test_a_process_exits_with_a_loader_worker_that_ignores_sigterm_still_running():
    """The exit backstop runs before multiprocessing's exit handler, whose SIGTERM such a worker ignores."""
    code = ("import torch.utils.data as d\nfrom dho_pipeline.data.loader_workers import start_loader\n"
            "class Endless(d.IterableDataset):\n    def __iter__(self):\n        while True:\n            yield 0\n"
            "batches = start_loader(Endless(), 1, pin_memory=False, deaf=True)\n"
            "print(next(batches), flush=True)\n")
    ended = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True,
                           text=True, timeout=60)
    assert (ended.returncode, ended.stdout) == (0, "0\n"), ended.stderr


def test_a_dho_run_without_a_val_split_warns_that_final_pt_keeps_the_default_alpha_and_beta(shards_dir, teacher_file,
                                                                                          tmp_path):
    shards = shards_without(shards_dir, "val", tmp_path / "shards")
    config = train_config(tmp_path, shards, teacher_file, tmp_path / "no-store", steps=1)
    result = train(config, "--set", "teacher.mode=online", "--set", "teacher.online_views=fresh")
    assert result.exit_code == 0, result.output
    assert (f"warning: {shards} has no val split, so final.pt keeps the default alpha 0.4 and beta 0.5 "
            "(eval.default_alpha/beta)") in result.stderr and "--val-per-class N" in result.stderr, result.stderr
    final = load_checkpoint(tmp_path / "run" / "final.pt")
    assert (final["alpha"], final["beta"]) == (0.4, 0.5)


@pytest.mark.parametrize(("method", "deploys"), [("dho", r"at alpha ([\d.]+), beta ([\d.]+)"),
                                                 ("ce_only", "the CE head")])
def test_a_finished_run_ends_with_the_val_top1_of_what_it_deploys(method, deploys, cached_store, shards_dir,
                                                                  teacher_file, tmp_path):
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store, steps=2, method=method)
    result = train(config)
    assert result.exit_code == 0, result.output
    last_line = result.stdout.splitlines()[-1]
    found = re.fullmatch(rf"run: {re.escape(str(tmp_path / 'run'))}  \(val top-1 (\d\.\d{{3}}),? {deploys}\)",
                         last_line)
    assert found, last_line
    final = load_checkpoint(tmp_path / "run" / "final.pt")
    assert float(found[1]) == pytest.approx(final["val_top1"], abs=5e-4)
    if method == "dho":
        assert (float(found[2]), float(found[3])) == (final["alpha"], final["beta"])


def test_resume_from_a_truncated_last_pt_says_what_to_do(cached_store, shards_dir, teacher_file, tmp_path):
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store)
    assert train(config, "--max-steps", "4").exit_code == 0
    last = tmp_path / "run" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    one_line_error(train(config, "--resume"), f"{last}: not a readable checkpoint", "put back a copy of it",
                   "start over with --overwrite")


def test_checkpoints_load_in_threads_at_once(uninterrupted):
    """The weights-only loader's numpy allowance holds while another thread loads (kill_trials.py loads in threads)."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        states = list(pool.map(lambda _: load_checkpoint(uninterrupted / "final.pt")["step"], range(64)))
    assert states == [8] * 64


def test_a_run_stopped_while_it_sets_up_can_be_resumed(cached_store, shards_dir, teacher_file, tmp_path, monkeypatch):
    """A job script that always passes --resume: a first attempt killed before its first step leaves the run folder."""
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store, steps=2)

    def killed(_ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_student, "setup_student", killed)
    with pytest.raises(KeyboardInterrupt):
        train_student.run(load_config(config))
    assert (tmp_path / "run").is_dir()
    monkeypatch.undo()
    resumed = train(config, "--resume")
    assert resumed.exit_code == 0 and "starting at step 0" in resumed.stderr, resumed.output
    (tmp_path / "run" / "last.pt").unlink()
    one_line_error(train(config, "--resume"), "holds a finished run (final.pt) and no last.pt: nothing to resume")


def test_an_out_dir_under_or_at_a_file_is_named_in_one_line(cached_store, shards_dir, teacher_file, tmp_path):
    (tmp_path / "notes").write_text("a file, not a folder")
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store, out_dir=str(tmp_path / "notes" / "run"))
    one_line_error(train(config), f"{tmp_path / 'notes'}: a file, where the folder that holds")
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store, out_dir=str(tmp_path / "notes"))
    for args in ([], ["--overwrite"]):
        one_line_error(train(config, *args), f"{tmp_path / 'notes'} (train.out_dir) is a file, not a folder")


def test_a_second_run_into_a_folder_in_training_is_refused_naming_the_first(cached_store, shards_dir, teacher_file,
                                                                            tmp_path):
    from dho_pipeline.store.lock import store_write_lock

    config = train_config(tmp_path, shards_dir, teacher_file, cached_store)
    with store_write_lock(tmp_path / "run", hidden=True):  # as a first train-student into run/ holds it
        second = train(config)
    one_line_error(second, f"{tmp_path / 'run'}: being written by pid {os.getpid()} on host",
                   f"(lock file {tmp_path / '.run.lock'})")
    assert not (tmp_path / "run").exists(), "the second run wrote nothing"
    assert train(config).exit_code == 0 and sorted(p.name for p in tmp_path.glob("*run*")) == ["run", "run.yaml"], \
        "no lock file left, and none a glob of run folders would take for a run"


def test_evaluate_finds_a_runs_moved_shards_by_run_shards_and_refuses_other_ones(uninterrupted, shards_dir,
                                                                                  tmp_path):
    moved = tmp_path / "final.pt"
    torch.save({**load_checkpoint(uninterrupted / "final.pt"), "shards": str(tmp_path / "gone")}, moved)
    one_line_error(CliRunner().invoke(main, ["evaluate", str(moved)]), f"{tmp_path / 'gone'}: the shards {moved} was "
                   "trained on are not there (moved or on another machine?): give their folder with --run-shards DIR")

    def scores(*args: str) -> dict:
        result = CliRunner().invoke(main, ["evaluate", *args, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    assert scores(str(moved), "--run-shards", str(shards_dir)) == scores(str(uninterrupted / "final.pt"))
    other = Path(shutil.copytree(shards_dir, tmp_path / "other"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["splits"]["test"]["shards"][0]["sha256"] = "0" * 64  # as a test shard of other images
    (other / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(CliRunner().invoke(main, ["evaluate", str(moved), "--run-shards", str(other)]),
                   f"--run-shards {other}: not the shards {moved} was trained on", "--shards NAME=DIR")


@pytest.mark.parametrize(("student", "says"), [
    ({"model": "resnet99"}, "student.model: unknown timm model 'resnet99'"),
    ({"pretrained_file": "missing.safetensors"}, "student.pretrained_file: "),
], ids=["unknown-model", "missing-weights"])
def test_a_student_that_cannot_be_built_leaves_no_run_folder(student, says, cached_store, shards_dir, teacher_file,
                                                             tmp_path):
    config = train_config(tmp_path, shards_dir, teacher_file, cached_store)
    settings = [arg for key, value in student.items() for arg in ("--set", f"student.{key}={value}")]
    one_line_error(train(config, *settings), says)
    assert not (tmp_path / "run").exists()
