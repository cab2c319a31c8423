"""Shards and stores on an S3 API (moto's server on 127.0.0.1) and shards over HTTP, through the real stages."""

from __future__ import annotations

import collections
import dataclasses
import functools
import http.server
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from moto import server as moto_server

from dho_pipeline.cli import main
from dho_pipeline.config import load_config
from dho_pipeline.data.loader_workers import end_workers, start_loader
from dho_pipeline.data.shards import iter_shard, load_manifest, write_shards
from dho_pipeline.data.student_stream import StreamSpec, StudentStream
from dho_pipeline.data.views import ViewRecipe
from dho_pipeline.locations import UrlPath, _simplecache_root, location
from dho_pipeline.runtime import Runtime
from dho_pipeline.store import lock as store_lock
from dho_pipeline.store.copy import copy_store
from dho_pipeline.store.zarr_store import TeacherStore, _relative
from dho_pipeline.student.checkpoint import load_checkpoint
from stages import cache_teacher, train_student
from stages import evaluate as evaluate_stage
from tests.conftest import one_line_error, write_config
from tests.test_reliability_inputs import image_folder
from tests.test_reliability_shards import stopped_and_continued
from tests.test_stage_two import losses, train_config

CHECKED = ("logits", "boxes", "flips", "labels", "bad", "done", "checksums")


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """moto's S3 server on 127.0.0.1, found by s3fs through AWS_ENDPOINT_URL as a user's endpoint would be."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A new empty bucket: s3://NAME."""
    name = f"dho-{uuid.uuid4().hex[:12]}"
    UrlPath(f"s3://{name}").fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def http_shards(shards_dir):
    """The test shards served read-only by http.server on 127.0.0.1."""
    yield from serve(shards_dir, QuietHandler)


@pytest.fixture
def slow_http_shards(shards_dir):
    """The same, sent slowly, as by a far server."""
    yield from serve(shards_dir, SlowHandler)


def serve(folder: Path, handler: type[http.server.SimpleHTTPRequestHandler]) -> Iterator[str]:
    server = QuietServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    gets: collections.Counter = collections.Counter()  # path -> GET requests served

    def do_GET(self) -> None:
        QuietHandler.gets[self.path] += 1
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


class SlowHandler(QuietHandler):
    def copyfile(self, source, outputfile) -> None:  # about 80 KB/s: a shard takes a while to arrive
        while chunk := source.read(8192):
            outputfile.write(chunk)
            outputfile.flush()
            time.sleep(0.1)


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # clients that close early (a HEAD, a size probe) are not errors here


def same_arrays(a: TeacherStore, b: TeacherStore) -> None:
    for name in CHECKED:
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:], err_msg=name)


def test_stage_one_writes_an_s3_store_equal_to_the_local_one(bucket, shards_dir, teacher_file, cached_store,
                                                             tmp_path):
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file, cache={"root": f"{bucket}/cache"})
    stopped = cache_teacher.run(load_config(config), max_shards=3)  # a run stopped early, then resumed
    store = TeacherStore.open(stopped.path)
    assert isinstance(stopped.path, UrlPath) and stopped.path.name == cached_store.name
    assert sum(store.shard_done(s) for s in store.shards()) == 3
    finished = cache_teacher.run(load_config(config))
    assert finished.path == stopped.path and not finished.already_complete
    same_arrays(TeacherStore.open(finished.path), TeacherStore.open(cached_store))
    assert TeacherStore.open(finished.path).attrs == TeacherStore.open(cached_store).attrs
    assert cache_teacher.run(load_config(config)).already_complete

    leases = (location(f"{finished.path}.lock")).glob("g-*.json")  # the lock: one released lease left
    assert len(leases) == 1 and json.loads(leases[0].read_text())["released"]

    listed = CliRunner().invoke(main, ["cache", "list", "--root", f"{bucket}/cache"])
    assert listed.exit_code == 0 and str(finished.path) in listed.output and "done=100%" in listed.output, listed.output
    inspected = CliRunner().invoke(main, ["cache", "inspect", str(finished.path), "--json"])
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.output)["done_fraction"] == 1.0
    lost = finished.path / "logits" / "c" / "0" / "0" / "0"
    lost.fs.rm_file(lost.path)
    listed = CliRunner().invoke(main, ["cache", "list", "--root", f"{bucket}/cache"])
    assert "done=100%" not in listed.output and "DAMAGED: 1 shard" in listed.output, listed.output


def test_shards_and_store_on_s3_train_the_same_student(bucket, fmnist, shards_dir, teacher_file, cached_store,
                                                       tmp_path):
    manifest = load_manifest(shards_dir)
    uploaded = CliRunner().invoke(main, ["make-shards", str(fmnist.root), f"{bucket}/shards", "--shots", "4",
                                         "--val-per-class", "5", "--test-per-class", "10",
                                         "--max-train-per-class", "16", "--shard-size", "32"])
    assert uploaded.exit_code == 0, uploaded.output
    remote = load_manifest(f"{bucket}/shards")
    assert [(s.name, s.sha256) for s in remote.shards()] == [(s.name, s.sha256) for s in manifest.shards()]
    copied = CliRunner().invoke(main, ["cache", "copy", str(cached_store), f"{bucket}/store.zarr"])
    assert copied.exit_code == 0, copied.output
    assert re.search(r"copied \d+ shards \([\d.]+ KiB uncompressed\)", copied.stdout), copied.stdout

    local = train_student.run(load_config(train_config(tmp_path, shards_dir, teacher_file, cached_store, "local",
                                                       steps=3, log_every=1), ["data.num_workers=1"]))
    config = train_config(tmp_path, shards_dir, teacher_file, f"{bucket}/store.zarr", "remote", steps=3, log_every=1)
    cfg = load_config(config, [f"data.shards={bucket}/shards", "data.num_workers=1"])
    remote_run = train_student.run(cfg)
    assert losses(remote_run) == losses(local)
    final = load_checkpoint(remote_run / "final.pt")
    assert final["store"] == f"{bucket}/store.zarr" and final["shards"] == f"{bucket}/shards"


def test_make_shards_to_s3_uploads_nothing_when_a_source_file_is_no_image(bucket, tmp_path):
    source = image_folder(tmp_path / "src", {"bag": 6, "coat": 6})
    (source / "train" / "coat" / "broken.png").write_text("garbage\n")
    result = CliRunner().invoke(main, ["make-shards", str(source), f"{bucket}/shards", "--shots", "1",
                                       "--shard-size", "2"])
    one_line_error(result, str(source / "train" / "coat" / "broken.png"))
    assert not UrlPath(bucket).fs.find(UrlPath(bucket).path), "the shards uploaded before the bad file are removed"


def test_a_stopped_make_shards_to_s3_continues_to_the_same_shards(bucket, fmnist, shards_dir, monkeypatch):
    read_again = stopped_and_continued(fmnist, f"{bucket}/shards", monkeypatch)
    assert len(read_again) == 310 - 40 - 32  # the 3 shards uploaded before the stop are not written again
    remote, local = load_manifest(f"{bucket}/shards"), load_manifest(shards_dir)
    assert [(s.name, s.sha256) for s in remote.shards()] == [(s.name, s.sha256) for s in local.shards()]


def test_loader_workers_leave_the_parents_s3_sessions_alone(bucket, shards_dir, cached_store):
    """Forked loader workers inherit the parent's S3 filesystems (zarr's asynchronous one included). Collected
    in a worker, zarr's logged 'Unclosed client session' once per worker and s3fs closed the parent's client
    there; a full collection early in each worker (what a long run does sooner or later) makes that certain."""
    location(bucket).fs.put(str(cached_store), f"{bucket[5:]}/store.zarr", recursive=True)  # its files as they are
    code = (
        "import gc\n"
        "from torch.utils.data import DataLoader\n"
        "from dho_pipeline.data.shards import load_manifest\n"
        "from dho_pipeline.data.student_stream import StreamSpec, StudentStream\n"
        f"shards = load_manifest({str(shards_dir)!r}).splits['labelled']\n"
        f"stream = StudentStream(shards, '{bucket}/store.zarr', StreamSpec(student_size=32), batch_size=8)\n"
        "loader = DataLoader(stream, batch_size=None, num_workers=2, worker_init_fn=lambda _: gc.collect())\n"
        "batches = iter(loader)\n"
        "print(sum(len(next(batches)['row']) for _ in range(4)), flush=True)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "32", run.stderr
    assert "Unclosed" not in run.stderr, run.stderr


@pytest.mark.parametrize("cache", ["", "simplecache::"])
def test_shards_over_http_read_as_the_local_files(cache, http_shards, shards_dir):
    local, served = load_manifest(shards_dir), load_manifest(cache + http_shards)
    shard = served.splits["unlabelled"][1]
    assert isinstance(shard.path, UrlPath) and shard.path.url == f"{cache}{http_shards}/{shard.name}"
    served.check_files(served.shards())
    expected = [(s["__key__"], s["png"]) for s in iter_shard(local.splits["unlabelled"][1])]
    served = []  # GET requests for the shard after each read
    for _ in range(3):
        assert [(s["__key__"], s["png"]) for s in iter_shard(shard)] == expected
        served.append(QuietHandler.gets[f"/{shard.name}"])
    if cache:  # fetched by the first read only; later reads come from the local copy
        assert served[0] > 0 and served[2] == served[0], served
    else:
        assert served[2] > served[1] > served[0], served
    with pytest.raises(ValueError, match="read-only"):
        write_shards(None, {}, location(f"{cache}{http_shards}/new"))


def test_loader_workers_reading_the_same_shards_through_simplecache_each_read_them_whole(slow_http_shards):
    """A split of fewer shards than loader workers is read by every worker: none may read another's download
    before it is complete (the shard's sha256 would not match)."""
    one_shard = load_manifest(f"simplecache::{slow_http_shards}").splits["labelled"][:1]
    stream = StudentStream(one_shard, None, StreamSpec(student_size=32, cached_logits=False,
                                                       fresh_views=ViewRecipe()), batch_size=8)
    batches = start_loader(stream, num_workers=2, pin_memory=False, deaf=False)
    try:
        labels = [next(batches)["label"] for _ in range(4)]  # the shard's 32 images, half from each worker
        copies = [_simplecache_root() / str(worker.pid) for worker in batches._workers]
        assert all(folder.is_dir() for folder in copies)
    finally:
        end_workers(batches)
    assert sum(len(b) for b in labels) == 32
    assert not any(folder.exists() for folder in copies)  # gone with their workers


def test_a_store_behind_a_cache_prefix_is_refused_in_one_line(bucket):
    result = CliRunner().invoke(main, ["cache", "inspect", f"simplecache::{bucket}/store.zarr"])
    one_line_error(result, "drop the 'simplecache::' prefix")


@pytest.mark.parametrize(("stop_signal", "named"), [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_or_sigterm_stops_cache_copy_after_the_shards_in_flight(cached_store, tmp_path, monkeypatch,
                                                                       stop_signal, named, sigterm_not_taken):
    shards = TeacherStore.open(cached_store).shards()
    real_write = TeacherStore.write_shard

    def slow_write(store, shard, **arrays):  # each shard takes a while, as over a network
        time.sleep(0.2)
        real_write(store, shard, **arrays)

    def stopped_after_the_first(results, **_):  # stands in for tqdm: the signal once the first shard is copied
        yield next(iter(results))
        signal.raise_signal(stop_signal)  # SIGINT raises KeyboardInterrupt here, as Ctrl-C does

    monkeypatch.setattr("dho_pipeline.store.copy.COPY_THREADS", 2)
    monkeypatch.setattr(TeacherStore, "write_shard", slow_write)
    monkeypatch.setattr("dho_pipeline.store.copy.tqdm", stopped_after_the_first)
    copy = tmp_path / "copy.zarr"
    stopped = CliRunner().invoke(main, ["cache", "copy", str(cached_store), str(copy)])
    assert stopped.exit_code == 128 + stop_signal, stopped.output
    assert stopped.stderr.splitlines()[-1] == (f"cache copy stopped ({named}); {copy} keeps every shard copied: "
                                               f"continue with dho cache copy {cached_store} {copy}")
    copied = sum(TeacherStore.open(copy).shard_done(s) for s in shards)
    assert 1 <= copied <= 4 < len(shards)  # the first, the two in flight, maybe one more: not every shard

    monkeypatch.undo()
    resumed = copy_store(cached_store, copy, progress=False)
    assert (resumed.copied, resumed.already_there) == (len(shards) - copied, copied)
    same_arrays(TeacherStore.open(copy), TeacherStore.open(cached_store))


def test_cache_copy_resumes_and_checks_the_copy(bucket, cached_store, tmp_path, monkeypatch):
    shards = TeacherStore.open(cached_store).shards()
    written = []
    real_write = TeacherStore.write_shard

    def killed_after_four(store, shard, **arrays):
        if len(written) == 4:
            raise KeyboardInterrupt  # the copy is stopped here, as by Ctrl-C
        written.append(shard.name)
        real_write(store, shard, **arrays)

    monkeypatch.setattr("dho_pipeline.store.copy.COPY_THREADS", 1)  # in order, so the first four are known
    monkeypatch.setattr(TeacherStore, "write_shard", killed_after_four)
    with pytest.raises(KeyboardInterrupt):
        copy_store(cached_store, f"{bucket}/copy.zarr", progress=False)
    monkeypatch.setattr(TeacherStore, "write_shard", real_write)
    monkeypatch.setattr("dho_pipeline.store.copy.COPY_THREADS", 8)
    partial = TeacherStore.open(f"{bucket}/copy.zarr")
    assert [s.name for s in shards if partial.shard_done(s)] == written

    resumed = copy_store(cached_store, f"{bucket}/copy.zarr", progress=False)
    assert (resumed.copied, resumed.already_there) == (len(shards) - 4, 4)
    same_arrays(TeacherStore.open(f"{bucket}/copy.zarr"), TeacherStore.open(cached_store))

    back = copy_store(f"{bucket}/copy.zarr", tmp_path / "back.zarr", progress=False)  # S3 -> local
    assert back.copied == len(shards)
    same_arrays(TeacherStore.open(tmp_path / "back.zarr"), TeacherStore.open(cached_store))

    cut_short = location(f"{bucket}/cut-short.zarr")  # a publish stopped before the group's zarr.json
    cut_short.fs.copy(location(f"{bucket}/copy.zarr/logits/zarr.json").path, (cut_short / "logits/zarr.json").path)
    assert copy_store(cached_store, cut_short, progress=False).copied == len(shards)
    same_arrays(TeacherStore.open(cut_short), TeacherStore.open(cached_store))

    TeacherStore.open(tmp_path / "back.zarr", mode="a").group.attrs["fingerprint_hash"] = "0" * 64  # another store
    result = CliRunner().invoke(main, ["cache", "copy", str(cached_store), str(tmp_path / "back.zarr")])
    one_line_error(result, str(tmp_path / "back.zarr"), "another fingerprint")


def test_a_store_still_being_written_is_copied_as_it_was_when_the_copy_began(cached_store, tmp_path, monkeypatch):
    source_path = tmp_path / "source.zarr"
    shutil.copytree(cached_store, source_path)
    source, finished = TeacherStore.open(source_path, mode="a"), TeacherStore.open(cached_store)
    shards = source.shards()
    for shard in shards[-2:]:  # a stage one under way: its last two shards still to come
        source.unmark(shard)
    copy_shard = TeacherStore.write_shard

    def stage_one_finishes_a_shard_meanwhile(store, shard, **arrays):
        copy_shard(store, shard, **arrays)
        if not source.shard_done(shards[-2]):
            copy_shard(source, shards[-2], **finished.read_checked_arrays(shards[-2]))

    monkeypatch.setattr(TeacherStore, "write_shard", stage_one_finishes_a_shard_meanwhile)
    monkeypatch.setattr("dho_pipeline.store.copy.COPY_THREADS", 1)  # one copy thread: the shard is finished once
    first = copy_store(source_path, tmp_path / "copy.zarr", progress=False)
    assert (first.copied, first.not_computed) == (len(shards) - 2, 2)
    monkeypatch.undo()
    second = copy_store(source_path, tmp_path / "copy.zarr", progress=False)  # later: what it finished since
    assert (second.copied, second.already_there, second.not_computed) == (1, len(shards) - 2, 1)


def test_object_store_lock_refuses_a_second_writer_and_takes_over_a_silent_one(bucket, monkeypatch, capsys):
    monkeypatch.setattr(store_lock, "HEARTBEAT_S", 0.05)
    store = location(f"{bucket}/cache/x.zarr")
    with store_lock.store_write_lock(store) as lease:
        with pytest.raises(store_lock.StoreLocked, match=r"being written by pid \d+ on host"):
            with store_lock.store_write_lock(store):
                pass
        lease.check()
    with store_lock.store_write_lock(store):  # released: the next writer gets it at once
        pass

    killed = store_lock.lock_path(store) / "g-000003.json"  # a holder that stopped beating a while ago
    killed.write_text(json.dumps({"host": "gpu-node-7", "pid": 4242, "since": time.time() - 900,
                                  "command": "dho cache-teacher", "heartbeat": time.time() - 600}))
    with store_lock.store_write_lock(store) as lease:
        assert "taking over the lock left by pid 4242 on host gpu-node-7" in capsys.readouterr().err
        newer = store_lock.lock_path(store) / "g-000005.json"  # someone takes it over from this holder
        newer.write_text(json.dumps({"host": "other", "pid": 7, "since": time.time(), "command": "dho",
                                     "heartbeat": time.time()}))
        deadline = time.time() + 10
        while not lease.lost_to and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(store_lock.StoreLocked, match="lost the write lock to pid 7 on host other"):
            lease.check()


@dataclasses.dataclass(frozen=True)
class OtherRank(Runtime):
    """A rank other than 0 of a torchrun job, whose broadcasts receive `from_rank_zero`."""

    from_rank_zero: object = None

    def broadcast(self, value: object) -> object:
        return self.from_rank_zero


def listing_times_out(_folder) -> None:
    raise OSError("Read timeout on endpoint URL")


def test_other_ranks_stop_once_rank_zeros_object_store_lease_is_taken_over(bucket, monkeypatch):
    store = location(f"{bucket}/cache/ranks.zarr")
    with store_lock.rank_zero_lock(store, Runtime(torch.device("cpu"))) as rank_zero:
        rank_one = OtherRank(torch.device("cpu"), rank=1, world_size=2, from_rank_zero=(None, rank_zero.number))
        with store_lock.rank_zero_lock(store, rank_one) as follower:
            follower.check()  # rank 0 holds the lock
            with monkeypatch.context() as unreachable:  # a listing that fails once does not stop the rank
                unreachable.setattr(store_lock, "_leases", listing_times_out)
                follower.check()
            taken_over = store_lock.lock_path(store) / f"g-{rank_zero.number + 1:06d}.json"
            taken_over.write_text(json.dumps({"host": "other", "pid": 7, "since": time.time(), "command": "dho",
                                              "heartbeat": time.time()}))
            with pytest.raises(store_lock.StoreLocked, match="lost the write lock to pid 7 on host other"):
                follower.check()


def test_two_writers_racing_for_the_same_lease_number(bucket, monkeypatch):
    store = location(f"{bucket}/x.zarr")
    with store_lock.store_write_lock(store):  # holds g-000001.json; the other writer listed the folder before it
        monkeypatch.setattr(store_lock, "_leases", lambda folder: [])
        with pytest.raises(store_lock.StoreLocked, match="another writer took the lock at the same moment"):
            with store_lock.store_write_lock(store):
                pass


def test_a_holder_whose_heartbeats_fail_stops_before_it_can_be_taken_over(bucket, monkeypatch, capsys):
    monkeypatch.setattr(store_lock, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(store_lock, "LEASE_S", 1.0)

    def unreachable(self) -> None:
        raise OSError("connection reset by peer")

    with store_lock.store_write_lock(location(f"{bucket}/x.zarr")) as lease:
        monkeypatch.setattr(store_lock._Heartbeat, "beat", unreachable)
        lease.check()
        time.sleep(0.7)  # past LEASE_S / 2 without a heartbeat landing
        with pytest.raises(store_lock.StoreLocked, match="no lock heartbeat has landed"):
            lease.check()
    assert "lock heartbeat failed (OSError: connection reset by peer); retrying" in capsys.readouterr().err


def test_a_url_without_its_backend_names_the_extra():
    result = CliRunner().invoke(main, ["cache", "inspect", "gs://bucket/store.zarr"])
    one_line_error(result, "gs://", "pip install -e '.[gcs]'")


def test_evaluate_names_a_store_that_is_not_the_one_trained_from(cached_store, shards_dir, teacher_file, tmp_path,
                                                                 capsys):
    store = tmp_path / "store.zarr"
    copy_store(cached_store, store, progress=False)
    run = train_student.run(load_config(train_config(tmp_path, shards_dir, teacher_file, store, steps=2)))
    final = load_checkpoint(run / "final.pt")
    assert final["store_fingerprint"] == TeacherStore.open(store).attrs["fingerprint_hash"]
    assert evaluate_stage.run(run / "final.pt")["teacher"] is not None

    TeacherStore.open(store, mode="a").group.attrs["fingerprint_hash"] = "f" * 64  # another store at that path
    assert evaluate_stage.run(run / "final.pt")["teacher"] is None
    assert f"{store}: not the store this student was trained from (fingerprint ffffffffffff" in capsys.readouterr().err


def test_stage_one_stops_before_the_next_shard_once_its_lease_is_lost(shards_dir, teacher_file, tmp_path,
                                                                       monkeypatch):
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file, cache={"store": str(tmp_path / "s.zarr")})
    checks = []

    def lost_after_two(lease) -> None:
        checks.append(1)
        if len(checks) > 2:
            raise store_lock.StoreLocked("lost the write lock to pid 7 on host other")

    monkeypatch.setattr(store_lock.Lease, "check", lost_after_two)
    with pytest.raises(store_lock.StoreLocked, match="lost the write lock"):
        cache_teacher.run(load_config(config))
    store = TeacherStore.open(tmp_path / "s.zarr")
    assert sum(store.shard_done(s) for s in store.shards()) == 2


@pytest.mark.parametrize("store", ["s3a://bucket/x.zarr", "memory://name/x.zarr"])
def test_a_listed_chunk_is_found_in_its_store_however_the_listing_spells_the_scheme(store):
    """cache list expects chunk files by their path in the store: s3a:// lists as s3://, memory://name as
    memory:///name, and every chunk looked missing."""
    folder = location(store)
    listed = location(folder.fs.unstrip_protocol((folder / "labels" / "c" / "0").path))
    assert listed.url != f"{store}/labels/c/0"  # the spelling the old slicing got wrong
    assert _relative(listed, folder) == "labels/c/0"
