"""Stage one: run the open_clip teacher once over every shard and write its logits to the Zarr store.

Work is done shard by shard (a shard is one chunk of the store); a shard is written whole, checksummed and
then marked done, so a killed run resumes where it stopped and the result equals an uninterrupted run.
A rerun of a finished store verifies it and exits without building the teacher; otherwise the finished
shards are verified first and any whose chunks were lost or damaged are recomputed. One process writes a
store at a time (a lock beside it); under torchrun, rank 0 holds the lock and lists the pending shards, and
rank r takes every world_size-th of them. Each shard file is checked against its sha256 before use.

The loop keeps the accelerator busy: batch i+1 is queued on it before batch i's logits are collected,
and a finished shard is written by a background thread while the teacher goes on.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dho_pipeline.config import ConfigError, PipelineConfig
from dho_pipeline.data.loader_workers import end_workers, start_loader
from dho_pipeline.data.shards import SOURCES, Manifest, Shard, load_manifest
from dho_pipeline.data.teacher_views import TeacherViewBatches, views_for_split, views_on, warn_if_rendering_on_cpu
from dho_pipeline.data.views import ViewRecipe, normalize
from dho_pipeline.errors import warn
from dho_pipeline.locations import Location
from dho_pipeline.runtime import HostCopy, Runtime, init_runtime
from dho_pipeline.stop_request import takes_signals
from dho_pipeline.store.lock import Lease, rank_zero_lock
from dho_pipeline.store.lookup import finished_store, stage_one_request, store_path, view_recipe
from dho_pipeline.store.zarr_store import NOT_DONE, TeacherStore, build_fingerprint, fingerprint_hash
from dho_pipeline.teacher.open_clip_teacher import Teacher, load_teacher
from dho_pipeline.teacher.tip_adapter import attach_adapter


@dataclass
class StageOneReport:
    """Where the store is and how the run went: views computed by this process and where the time went."""

    path: Path
    sources: Location | None = None  # the shard set's folder when it names source files (sources.json)
    views: int = 0
    seconds: float = 0.0
    startup_s: float = 0.0  # from the start until the first batch's logits were back
    startup_views: int = 0  # the views of that first batch
    already_complete: bool = False
    bad_images: int = 0  # images the store marks undecodable and skipped (data.on_bad_image: skip)
    shards_left: int = 0  # shards still to compute after a run cut short by max_shards

    @property
    def steady_views_per_s(self) -> float:
        """Views/s after the first batch: what a long run converges to."""
        return (self.views - self.startup_views) / max(self.seconds - self.startup_s, 1e-9)

    def summary(self) -> str:
        if self.already_complete:
            done = f"{self.path}: already complete and verified; nothing to compute"
        elif not self.views:
            done = f"{self.path}: no shards left to compute"
        elif self.views == self.startup_views:  # one batch: no steady state to tell
            done = f"{self.path}: {self.views:,} views in {self.seconds:.1f} s"
        else:
            done = (f"{self.path}: {self.views:,} views in {self.seconds:.1f} s (start-up {self.startup_s:.1f} s, "
                    f"then {self.steady_views_per_s:,.0f} views/s)")
        if self.shards_left:
            done += (f"\nunfinished: {self.shards_left} shard{'s' * (self.shards_left > 1)} left; the same command "
                     "without --max-shards computes them")
        if self.bad_images:
            inspect = ["dho", "cache", "inspect", str(self.path)]
            listed = (f"with their source files by `{shlex.join([*inspect, '--shards', str(self.sources)])}`"
                      if self.sources else f"by `{shlex.join(inspect)}`")
            done += f"\n{self.bad_images} bad image{'s' if self.bad_images > 1 else ''} skipped (listed {listed})"
        return done


def run(cfg: PipelineConfig, overwrite: bool = False, max_shards: int | None = None) -> StageOneReport:
    """Fill the store for `cfg`; `max_shards` stops early (the rest on a later run)."""
    started = time.perf_counter()
    runtime = init_runtime(cfg.train.device)
    manifest = load_manifest(cfg.location(cfg.data.shards))
    classes = len(manifest.class_names)
    if cfg.cache.top_k is not None and cfg.cache.top_k > classes:
        raise ConfigError(f"cache.top_k: {cfg.cache.top_k}, but the shards have {classes} classes: set it at most "
                          f"{classes}, or null to keep every logit")
    recipe = view_recipe(cfg)
    request = fingerprint_hash(stage_one_request(cfg, manifest, runtime.device))
    if not overwrite:
        finished = runtime.broadcast(finished_store(cfg, request) if runtime.is_main else None)
        if finished is not None:
            bad = TeacherStore.open(finished).bad_images() if runtime.is_main else 0
            return StageOneReport(finished, sources_folder(manifest) if bad else None,
                                  seconds=time.perf_counter() - started, already_complete=True, bad_images=bad)

    warn_if_rendering_on_cpu(cfg.teacher.render, runtime.device, cfg.data.num_workers)  # when there is work
    teacher = load_teacher(cfg.teacher, manifest.class_names, runtime.device, cfg.base_dir)
    attach_adapter(teacher, cfg, manifest, runtime)  # Tip-Adapter(-F) teachers only
    fingerprint = build_fingerprint(teacher.fingerprint, dataclasses.asdict(recipe), manifest, cfg.cache.top_k)
    path = store_path(cfg, fingerprint)
    report = StageOneReport(path)

    with rank_zero_lock(path, runtime) as lease:  # one writer: rank 0 holds it for ranks that split the shards
        if runtime.is_main:
            store = TeacherStore.open_or_create(path, fingerprint, manifest, 1 + recipe.count, overwrite,
                                                with_zero_shot=teacher.adapter is not None, request=request,
                                                top_k=cfg.cache.top_k)
            unmark_damaged(store)
        # rank 0 lists the pending shards for every rank: a rank listing them itself could see shards that a
        # faster rank has finished meanwhile, take a different share, and leave a shard unwritten
        pending = runtime.broadcast(pending_rows(store, manifest) if runtime.is_main else None)
        pending = [s for s in manifest.shards() if s.first_row in pending][runtime.rank:: runtime.world_size]
        store = TeacherStore.open(path, mode="a")
        store.check_fingerprint(fingerprint)
        pending = pending[:max_shards] if max_shards is not None else pending
        manifest.check_files(pending)
        first_done, report.startup_views = write_pending(store, pending, teacher, recipe, cfg, runtime, lease)
        report.views = sum(s.count * views_for_split(s.split, recipe) for s in pending)
        report.startup_s = (first_done or time.perf_counter()) - started
        runtime.barrier()
    report.seconds = time.perf_counter() - started
    report.bad_images = store.bad_images() if runtime.is_main else 0  # every rank's shards, and earlier runs
    report.shards_left = len(pending_rows(store, manifest)) if runtime.is_main and max_shards is not None else 0
    report.sources = sources_folder(manifest) if report.bad_images else None
    return report


def pending_rows(store: TeacherStore, manifest: Manifest) -> set[int]:
    """The first rows of the manifest's shards that the store has not finished."""
    return {s.first_row for s in manifest.shards() if not store.shard_done(s)}


def unmark_damaged(store: TeacherStore) -> None:
    """Verify every shard marked done against its checksums; mark the damaged ones for recomputing."""
    for shard, problem in store.check_shards(progress=True).items():
        if problem not in (None, NOT_DONE):
            warn(f"{store.path}: shard {shard.name}: {problem}; recomputing it")
            store.unmark(shard)


def write_pending(store: TeacherStore, pending: list[Shard], teacher: Teacher, recipe: ViewRecipe,
                  cfg: PipelineConfig, runtime: Runtime, lease: Lease) -> tuple[float | None, int]:
    """Run the teacher over the pending shards' views and write each shard once all its rows are in.

    `lease` is the store's write lock: a writer that has lost it (an object-store lock taken over after
    its holder went silent) stops before writing another shard.

    Returns when the first batch's logits were back (time.perf_counter; None when nothing was pending) and its
    number of views: the start-up a benchmark separates from the steady state.
    """
    dataset = TeacherViewBatches(pending, recipe, teacher.image_size, cfg.teacher.batch_size,
                                 skip_bad=cfg.data.on_bad_image == "skip",
                                 render_on_device=cfg.teacher.render == "device")
    rows = ShardBuffers(store, pending, 1 + recipe.count, lease)
    first_done, first_views, in_flight = None, 0, None
    with tqdm(total=sum(s.count for s in pending), desc=f"cache-teacher [rank {runtime.rank}]", unit="img",
              disable=not runtime.is_main) as bar:
        # workers deaf to Ctrl-C and SIGTERM where this process takes them (the CLI turns SIGTERM into a
        # KeyboardInterrupt): it stops, then ends the workers
        loader = start_loader(dataset, min(cfg.data.num_workers, len(pending)), runtime.device.type == "cuda",
                              deaf=takes_signals(runtime.world_size))
        try:
            for batch in loader:
                outputs = queue_teacher(teacher, views_on(batch, runtime.device, teacher.image_size), store.top_k)
                if in_flight is not None:  # the previous batch's logits: collected while this one runs
                    bar.update(rows.add(*in_flight))
                    first_done = first_done or time.perf_counter()
                else:
                    first_views = batch["flips"].shape[0] * batch["flips"].shape[1]
                in_flight = (batch, outputs)
            if in_flight is not None:
                bar.update(rows.add(*in_flight))
                first_done = first_done or time.perf_counter()
            rows.flush()
        finally:  # also on Ctrl-C or an error: the caller releases the store's lock next
            try:
                rows.close()
            finally:  # a second Ctrl-C cut the wait short
                end_workers(loader)
    return first_done, first_views


def sources_folder(manifest: Manifest) -> Location | None:
    """The shard set's folder when its sources.json names each sample's source file, else None."""
    try:
        return manifest.root if (manifest.root / SOURCES).exists() else None
    except OSError:  # a remote shard set that cannot be asked: the command without --shards still lists them
        return None


def queue_teacher(teacher: Teacher, images: torch.Tensor, top_k: int | None) -> HostCopy:
    """Queue the teacher on a batch of uint8 views (N, V, 3, S, S) on its device; its outputs come back without
    waiting.

    The logits of every view (or, for a top-k store, their k largest with classes and log-sum-exp), plus
    the clean view's zero-shot logits when an adapter makes the logits.
    """
    n, views = images.shape[:2]
    features = teacher.features(normalize(images.flatten(0, 1), teacher.mean, teacher.std))
    logits = teacher.head(features).view(n, views, -1)
    if top_k:
        top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        outputs = {"top_values": top.values, "top_indices": top.indices, "lse": logits.logsumexp(-1)}
    else:
        outputs = {"logits": logits}
    if teacher.adapter is not None:  # the clean view's zero-shot logits, to report what the adapter adds
        outputs["zero_shot"] = teacher.zero_shot(features.view(n, views, -1)[:, 0])
    return HostCopy(outputs)


class ShardBuffers:
    """Per-shard row buffers filled batch by batch; a full shard is written by a background thread.

    One write is in flight at a time, so a failing write (a full disk) stops the run at the next shard.
    """

    def __init__(self, store: TeacherStore, shards: list[Shard], views: int, lease: Lease):
        self.store, self.shards, self.views, self.lease = store, shards, views, lease
        self.buffers: dict[int, dict[str, np.ndarray]] = {}
        self.filled: dict[int, int] = {}
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self.writing: Future | None = None

    def add(self, batch: dict, outputs: HostCopy) -> int:
        """Copy one batch's rows into its shard's buffer; returns the number of images added."""
        index = batch["shard"]
        shard = self.shards[index]
        if index not in self.buffers:
            self.buffers[index] = _empty_rows(self.store, shard.count, self.views)
            self.filled[index] = 0
        values = outputs.wait()
        at = batch["rows"] - shard.first_row
        n, views = batch["boxes"].shape[:2]
        buf = self.buffers[index]
        for name, value in values.items():
            if name == "zero_shot":  # the clean view's only
                buf[name][at] = value
            else:
                buf[name][at, :views] = value
        for name in ("logits", "top_values", "lse", "zero_shot"):  # not computed: an undecodable image
            if name in buf:
                buf[name][at[batch["bad"]]] = np.nan
        if "top_indices" in buf:
            buf["top_indices"][at[batch["bad"]]] = -1
        buf["boxes"][at, :views] = batch["boxes"]
        buf["flips"][at, :views] = batch["flips"]
        buf["labels"][at] = batch["labels"]
        buf["bad"][at] = batch["bad"]
        self.filled[index] += n
        if self.filled[index] == shard.count:
            self._wait_for_write()
            self.lease.check()
            self.writing = self.writer.submit(self.store.write_shard, shard, **self.buffers.pop(index))
        return n

    def flush(self) -> None:
        """Wait for the last write; raises what it raised."""
        self._wait_for_write()

    def close(self) -> None:
        """Wait for the write in flight, however the run ends: no write may outlive the store's lock."""
        self.writer.shutdown(wait=True)

    def _wait_for_write(self) -> None:
        if self.writing is not None:
            self.writing.result()
            self.writing = None


def _empty_rows(store: TeacherStore, count: int, views: int) -> dict[str, np.ndarray]:
    """One shard's buffers of every array the store checks, filled as 'not computed'."""
    classes, k = store.num_classes, store.top_k
    rows = {
        "logits": np.full((count, views, classes), np.nan, np.float32),
        "top_values": np.full((count, views, k or 0), np.nan, np.float32),
        "top_indices": np.full((count, views, k or 0), -1, np.int64),
        "lse": np.full((count, views), np.nan, np.float32),
        "boxes": np.zeros((count, views, 4), np.float32),
        "flips": np.zeros((count, views), bool),
        "labels": np.full(count, -1, np.int16),
        "bad": np.zeros(count, bool),
        "zero_shot": np.full((count, classes), np.nan, np.float32),
    }
    return {name: rows[name] for name in store.checked}
