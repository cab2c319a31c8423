"""The store survives damage and misuse: every chunk verified, atomic creation, one writer, checked shards."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from dho_pipeline.cli import main
from dho_pipeline.config import load_config
from dho_pipeline.data.shards import load_manifest, write_shards
from dho_pipeline.data.splits import split_source
from dho_pipeline.store.lock import lock_path
from dho_pipeline.store.zarr_store import TeacherStore
from stages import cache_teacher
from tests.conftest import SHARD_SIZE, one_line_error, resize_tmpfs, tmpfs, write_config

pytestmark = pytest.mark.reliability

STUDENT = {"model": "resnet10t", "image_size": 32}
TRAIN = {"steps": 4, "batch_labelled": 8, "batch_unlabelled": 16, "log_every": 2, "checkpoint_every": 2}


@pytest.fixture
def store_copy(cached_store, shards_dir, teacher_file, tmp_path):
    """A copy of the cached_store store and a config (stage one and two) that names it."""
    path = tmp_path / "store.zarr"
    shutil.copytree(cached_store, path)
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file, cache={"store": str(path)},
                          student=STUDENT, train={**TRAIN, "out_dir": str(tmp_path / "run")})
    return path, config


def chunk_file(store, array: str, shard_index: int):
    """The file of `array`'s chunk for the shard at `shard_index` (zarr 3's default chunk keys)."""
    ndim = len(zarr.open_array(str(store / array)).shape)
    return store.joinpath(array, "c", str(shard_index), *["0"] * (ndim - 1))


def assert_same_store(a, b):
    x, y = TeacherStore.open(a), TeacherStore.open(b)
    assert x.fingerprint == y.fingerprint
    for name in ("logits", "boxes", "flips", "labels", "bad", "done", "checksums"):
        np.testing.assert_array_equal(x.group[name][:], y.group[name][:], err_msg=name)


def dho(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


DAMAGE = {
    "deleted": lambda f: f.unlink(),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]),
    "overwritten": lambda f: f.write_bytes(bytes(len(f.read_bytes()))),  # same size, other bytes
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_logits_chunk_is_named_and_exactly_its_shard_recomputed(damage, store_copy, cached_store):
    store, config = store_copy
    shard = TeacherStore.open(store).shards()[5]
    DAMAGE[damage](chunk_file(store, "logits", 5))  # a partial shard: its chunk also holds fill rows

    verify = dho("cache", "verify", store)
    assert verify.exit_code == 1 and f"DAMAGED {shard.name}: array 'logits'" in verify.output, verify.output
    inspect = dho("cache", "inspect", store)
    assert inspect.exit_code == 0 and f"DAMAGED      {shard.name}" in inspect.output, inspect.output
    one_line_error(dho("train-student", "-c", config), str(store), "array 'logits'", f"shard {shard.name}")

    damaged = chunk_file(store, "logits", 5)
    untouched = {f: f.stat().st_mtime_ns for f in (store / "logits").rglob("*") if f.is_file() and f != damaged}
    assert cache_teacher.run(load_config(config)).path == store
    rewritten = [f for f, mtime in untouched.items() if f.stat().st_mtime_ns != mtime]
    assert rewritten == [], "only the damaged shard's chunk may be written again"
    assert damaged.exists()
    assert_same_store(store, cached_store)


def test_cache_list_flags_a_shard_whose_chunk_file_is_missing(store_copy):
    store, _ = store_copy
    intact = dho("cache", "list", "--root", store.parent)
    assert "done=100%" in intact.output and "DAMAGED" not in intact.output, intact.output
    chunk_file(store, "logits", 5).unlink()
    listed = dho("cache", "list", "--root", store.parent)
    assert listed.exit_code == 0 and "done=100%" not in listed.output, listed.output
    assert f"DAMAGED: 1 shard, run `dho cache verify {store}`" in listed.output, listed.output


def test_evaluate_names_a_damaged_test_shard(store_copy):
    store, config = store_copy
    assert dho("train-student", "-c", config).exit_code == 0
    shard = TeacherStore.open(store).shards()[-1]
    DAMAGE["overwritten"](chunk_file(store, "logits", shard.first_row // SHARD_SIZE))
    one_line_error(dho("evaluate", load_config(config).path("run") / "final.pt"), str(store), "array 'logits'",
                   f"shard {shard.name}")


def test_verify_repair_recomputes_a_lost_mark_and_a_lost_checksum(store_copy, cached_store):
    store, config = store_copy
    chunk_file(store, "done", 2).unlink()  # reads as "not done": recomputed like an unfinished shard
    chunk_file(store, "checksums", 7).unlink()
    shards = TeacherStore.open(store).shards()
    before = dho("cache", "verify", store, "--json")
    assert before.exit_code == 1
    report = json.loads(before.output)
    assert report["not_computed"] == [shards[2].name]
    assert report["damaged"] == {shards[7].name: "array 'checksums': chunk missing"}
    usage = dho("cache", "verify", store, "--repair")
    assert usage.exit_code == 2 and "-c" in usage.output
    other = dho("cache", "verify", store, "--repair", "-c", config, "--set", "views.count=5")
    one_line_error(other, "fields that differ: views.count: store 3 vs config 5", "--repair recomputes shards as "
                   "the store made them: give the config it was made with")
    assert "--overwrite" not in other.output  # which would throw away the store's shards
    repaired = dho("cache", "verify", store, "--repair", "-c", config)
    assert repaired.exit_code == 0 and "0 damaged, 0 not computed yet" in repaired.output, repaired.output
    assert_same_store(store, cached_store)


def test_a_full_disk_in_stage_one_is_named_and_a_rerun_after_freeing_space_completes(shards_dir, teacher_file,
                                                                                    cached_store, tmp_path):
    used = sum(f.stat().st_blocks * 512 for f in cached_store.rglob("*") if f.is_file())
    with tmpfs(tmp_path / "disk", used // 2) as disk:
        store = disk / "store.zarr"
        config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file, cache={"store": str(store)})
        one_line_error(dho("cache-teacher", "-c", config), str(store), "no space left on device")
        resize_tmpfs(disk, used * 4)
        assert dho("cache-teacher", "-c", config).exit_code == 0
        assert_same_store(store, cached_store)


def test_a_store_whose_creation_was_interrupted_is_completed(shards_dir, teacher_file, cached_store, tmp_path):
    store = tmp_path / "cache" / "broken.zarr"  # what a kill between metadata and attributes left before
    group = zarr.open_group(str(store), mode="w")
    group.create_array("logits", shape=(10, 2, 3), chunks=(5, 2, 3), dtype="float16")
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file, cache={"store": str(store)})

    listed = dho("cache", "list", "--root", store.parent)
    assert listed.exit_code == 0 and "broken.zarr  unreadable: a zarr group without dho's attributes" in listed.output
    assert cache_teacher.run(load_config(config)).path == store
    assert_same_store(store, cached_store)


def test_a_killed_creation_leaves_nothing_and_the_next_run_cleans_up(shards_dir, teacher_file, tmp_path,
                                                                     monkeypatch):
    store = tmp_path / "new.zarr"
    config = load_config(write_config(tmp_path / "p.yaml", shards_dir, teacher_file, cache={"store": str(store)}))

    def killed(*args):
        raise KeyboardInterrupt  # stands for a kill after the arrays were made, before the rename

    monkeypatch.setattr(os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher.run(config, max_shards=1)
    monkeypatch.undo()
    assert not store.exists() and len(list(tmp_path.glob("new.zarr.creating-*"))) == 1
    cache_teacher.run(config, max_shards=1)
    assert TeacherStore.open(store).group["done"][:].any()
    assert not list(tmp_path.glob("new.zarr.creating-*")) and not lock_path(store).exists()


def test_overwrite_replaces_anything_and_nothing_else_does(shards_dir, teacher_file, tmp_path):
    store = tmp_path / "store.zarr"
    store.mkdir()
    (store / "notes.txt").write_text("someone's data")
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file, cache={"store": str(store)})
    one_line_error(dho("cache-teacher", "-c", config, "--max-shards", "1"), str(store), "--overwrite")
    assert (store / "notes.txt").read_text() == "someone's data"
    assert dho("cache-teacher", "-c", config, "--max-shards", "1", "--overwrite").exit_code == 0
    assert not (store / "notes.txt").exists() and TeacherStore.open(store).group["done"][:].any()


def test_store_lookup_under_cache_root_skips_and_names_a_broken_store(store_copy, tmp_path):
    store, config = store_copy
    (store.parent / "junk.zarr").mkdir()
    (store.parent / "junk.zarr" / "zarr.json").write_text("{not json")
    root_config = write_config(tmp_path / "root.yaml", *_shards_and_teacher(config), cache={"root": str(store.parent)},
                               student=STUDENT, train={**TRAIN, "out_dir": str(tmp_path / "run2")})
    result = dho("train-student", "-c", root_config)
    assert result.exit_code == 0, result.output
    assert "skipping" in result.output and "junk.zarr" in result.output


def test_a_folder_of_stores_given_as_a_store_is_named_and_never_replaced(store_copy):
    store, config = store_copy
    as_store = ["--set", f"cache.store={store.parent}"]
    for command in (["cache", "inspect", store.parent], ["cache", "verify", store.parent],
                    ["cache", "verify", store.parent, "--repair", "-c", config],
                    ["cache-teacher", "-c", config, *as_store, "--overwrite"]):  # it once removed every store
        one_line_error(dho(*command), f"{store.parent}: a folder of stores (1 *.zarr), not a store: name one "
                       f"(e.g. {store}), or list them with `dho cache list --root {store.parent}`")
        assert (store / "zarr.json").is_file() and not (store.parent / "zarr.json").exists()


@pytest.mark.parametrize(("stop_signal", "named"), [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_or_sigterm_stops_cache_teacher_and_the_same_command_continues_it(shards_dir, teacher_file, tmp_path,
                                                                                 stop_signal, named):
    store = tmp_path / "store.zarr"
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file, cache={"store": str(store)},
                          views={"count": 64}, data={"num_workers": 1})  # long enough to stop half-way

    def shards_done() -> list[bool]:
        try:
            opened = TeacherStore.open(store)
            return [opened.shard_done(s) for s in opened.shards()]
        except (FileNotFoundError, ValueError, KeyError):  # not created yet, or being created
            return []

    # Ctrl-C signals the whole process group, and so may a scheduler's SIGTERM: the loader worker too.
    process = subprocess.Popen([sys.executable, "-m", "dho_pipeline.cli", "cache-teacher", "-c", str(config)],
                               cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        while process.poll() is None and not any(shards_done()):
            time.sleep(0.01)
        os.killpg(process.pid, stop_signal)
        stderr = process.communicate(timeout=120)[1]
        with pytest.raises(ProcessLookupError):  # the loader worker ended with the run
            os.killpg(process.pid, 0)
    finally:  # a run that hangs must not outlive the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + stop_signal, stderr
    assert stderr.splitlines()[-1] == (f"cache-teacher stopped ({named}); the store keeps every finished shard: "
                                       f"continue with dho cache-teacher -c {config}"), stderr
    done = shards_done()
    assert 0 < sum(done) < len(done), done
    again = dho("cache-teacher", "-c", config)
    assert again.exit_code == 0, again.output
    assert all(shards_done()) and dho("cache", "verify", store).exit_code == 0


def _shards_and_teacher(config):
    cfg = load_config(config)
    return cfg.path(cfg.data.shards), cfg.path(cfg.teacher.pretrained)


@pytest.fixture
def own_shards(fmnist, tmp_path):
    splits = split_source(fmnist, shots=1, val_per_class=1, test_per_class=1, max_train_per_class=3, seed=4)
    write_shards(fmnist, splits, tmp_path / "shards", shard_size=SHARD_SIZE)
    return tmp_path / "shards", splits


def test_sigterm_before_the_first_shard_also_releases_the_lock_and_says_how_to_continue(
        shards_dir, teacher_file, tmp_path, monkeypatch, sigterm_not_taken):
    store = tmp_path / "store.zarr"
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file, cache={"store": str(store)})

    def terminated_while_verifying(_store) -> None:  # minutes on a big store, with the lock held
        assert lock_path(store).exists()
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(cache_teacher, "unmark_damaged", terminated_while_verifying)
    result = dho("cache-teacher", "-c", config)
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert result.stderr.splitlines()[-1] == ("cache-teacher stopped (SIGTERM); the store keeps every finished "
                                              f"shard: continue with dho cache-teacher -c {config}")
    assert not lock_path(store).exists()


def test_a_stopped_stage_one_finishes_the_shard_it_is_writing_before_it_lets_the_store_go(
        shards_dir, teacher_file, tmp_path, monkeypatch):
    """Ctrl-C (or an error) while a shard is written in the background: the write ends before the store's lock is
    released, so a writer that takes the lock next never finds another still writing."""
    store = tmp_path / "store.zarr"
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file, cache={"store": str(store)},
                          data={"num_workers": 0})
    write_shard, add = TeacherStore.write_shard, cache_teacher.ShardBuffers.add

    def slow_write(store, shard, **arrays):  # a big shard, or an object store
        time.sleep(1)
        write_shard(store, shard, **arrays)

    def ctrl_c_once_a_write_is_under_way(rows, batch, outputs):
        added = add(rows, batch, outputs)
        if rows.writing is not None:
            raise KeyboardInterrupt
        return added

    monkeypatch.setattr(TeacherStore, "write_shard", slow_write)
    monkeypatch.setattr(cache_teacher.ShardBuffers, "add", ctrl_c_once_a_write_is_under_way)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher.run(load_config(config))
    assert not lock_path(store).exists()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("store-writer")]
    opened = TeacherStore.open(store)
    assert [opened.shard_done(s) for s in opened.shards()].count(True) == 1  # the shard under way, whole


def test_a_shard_changed_after_make_shards_is_refused_by_both_stages(own_shards, fmnist, teacher_file, tmp_path):
    shards, splits = own_shards
    config = write_config(tmp_path / "p.yaml", shards, teacher_file, student=STUDENT,
                          train={**TRAIN, "out_dir": str(tmp_path / "run")})
    assert dho("cache-teacher", "-c", config).exit_code == 0
    # The same keys and row ids over other images: the unlabelled split's images in another order.
    shuffled = {**splits, "unlabelled": splits["unlabelled"][::-1]}
    write_shards(fmnist, shuffled, tmp_path / "other", shard_size=SHARD_SIZE)
    target = load_manifest(shards).splits["unlabelled"][0].path
    shutil.copy(tmp_path / "other" / target.name, target)
    one_line_error(dho("train-student", "-c", config), str(target), "sha256")
    fresh = f"cache.store={tmp_path / 'fresh.zarr'}"  # the finished store has no shard left to read
    one_line_error(dho("cache-teacher", "-c", config, "--set", fresh), str(target), "sha256")


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_missing_or_truncated_shard_is_named_in_one_line(damage, own_shards, teacher_file, tmp_path):
    shards, _ = own_shards
    config = write_config(tmp_path / "p.yaml", shards, teacher_file, student=STUDENT,
                          train={**TRAIN, "out_dir": str(tmp_path / "run")})
    assert dho("cache-teacher", "-c", config).exit_code == 0
    target = load_manifest(shards).splits["unlabelled"][0].path
    DAMAGE[damage](target)
    says = "missing" if damage == "deleted" else "bytes"
    one_line_error(dho("cache-teacher", "-c", config, "--set", f"cache.store={tmp_path / 'new.zarr'}"),
                   str(target), says)
    one_line_error(dho("train-student", "-c", config), str(target), says)


def test_a_shard_damaged_during_training_is_named_from_a_loader_worker(own_shards, teacher_file, tmp_path):
    shards, _ = own_shards
    config = write_config(tmp_path / "p.yaml", shards, teacher_file, student=STUDENT, data={"num_workers": 1},
                          train={**TRAIN, "out_dir": str(tmp_path / "run")})
    assert dho("cache-teacher", "-c", config).exit_code == 0
    target = load_manifest(shards).splits["unlabelled"][0].path
    target.write_bytes(target.read_bytes()[::-1])  # same size: only the worker's sha256 check can tell
    failed = dho("train-student", "-c", config)  # its traceback still holds the loader iterators
    one_line_error(failed, str(target), "sha256")
    assert not multiprocessing.active_children(), "workers that ignore SIGTERM must be shut down with the run"


def hold_lock(store):
    """A real second process that holds the store's write lock until killed."""
    code = ("import sys, time; from dho_pipeline.store.lock import store_write_lock\n"
            f"with store_write_lock({str(store)!r}):\n    print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    if holder.stdout.readline().strip() != "held":
        holder.kill()
        pytest.fail(f"the lock holder did not start (exit code {holder.wait()})")
    return holder


def test_a_second_writer_is_told_who_holds_the_store_and_a_dead_holders_lock_is_taken_over(
        store_copy, cached_store):
    store, config = store_copy
    chunk_file(store, "logits", 3).unlink()
    holder = hold_lock(store)
    try:
        refused = dho("cache-teacher", "-c", config)
        one_line_error(refused, str(store), f"pid {holder.pid} on host", "being written by")
        assert not chunk_file(store, "logits", 3).exists(), "a refused writer must not touch the store"
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(store).exists(), "kill -9 leaves the lock file behind"
    result = dho("cache-teacher", "-c", config)
    assert result.exit_code == 0 and f"taking over the lock left by pid {holder.pid}" in result.output
    assert_same_store(store, cached_store)
    assert not lock_path(store).exists()


def test_two_writers_started_together_on_a_new_store(shards_dir, teacher_file, cached_store, tmp_path):
    store = tmp_path / "new.zarr"
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file, cache={"store": str(store)})
    cmd = [sys.executable, "-m", "dho_pipeline.cli", "cache-teacher", "-c", str(config)]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        errors = [p.communicate(timeout=120)[1] for p in runs]
    finally:  # a writer that hangs must not outlive the test
        for p in runs:
            p.kill()
    results = [(p.returncode, err) for p, err in zip(runs, errors, strict=True)]
    codes = sorted(code for code, _ in results)
    if codes == [0, 0]:  # the first finished before the second took the lock: it found nothing to do
        assert_same_store(store, cached_store)
        return
    assert codes == [0, 1], results
    refused = next(err for code, err in results if code == 1)
    assert "being written by pid" in refused and "Traceback" not in refused
    assert_same_store(store, cached_store)
