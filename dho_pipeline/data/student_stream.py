"""Stage two's input: endless, seeded, resumable batches of student views joined with cached teacher rows.

Order. Epoch e permutes the split's shards with seed (seed, e); consumer c of C (C = world size x loader
workers) takes shards c, c + C, ... of that order, or, when there are fewer shards than consumers,
every C-th sample of all of them. Inside a shard, samples come in a permutation seeded by (seed, e, shard).
A consumer runs through epochs without end, so DataLoader's round-robin over workers is exact and
batch g of a rank is batch g // W of (logical) worker g % W: resuming at step s skips those batches by
arithmetic, without reading them.

Views. In epoch e, row r uses cached view 1 + (r + e + seed) mod K, so every view is used once every K
epochs. Its crop box and flip come from the store and are replayed on the decoded image. Online mode
with fresh views instead draws view 1 + e from the same seeded recipe (view_params) for the teacher.
One shard's store rows are read in one chunk read per array, never one read per sample, and checked
against the checksums stage one wrote with them; the shard's tar file against its sha256.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dho_pipeline.data.samples import parse_sample
from dho_pipeline.data.shards import Shard, iter_shard
from dho_pipeline.data.views import CLEAN_VIEW, ViewRecipe, render_view, view_params
from dho_pipeline.store.zarr_store import ShardRows, TeacherStore


def cached_view(row: int, epoch: int, num_random_views: int, seed: int) -> int:
    """The cached view row `row` uses in epoch `epoch`: 1 + (row + epoch + seed) mod K."""
    return 1 + (row + epoch + seed) % num_random_views


@dataclass(frozen=True)
class StreamSpec:
    """What a stream produces: student images always; teacher logits (cached) and/or teacher images (online)."""

    student_size: int
    seed: int = 0
    cached_logits: bool = True
    teacher_size: int | None = None  # online mode: also render the view at the teacher's resolution
    fresh_views: ViewRecipe | None = None  # online mode with fresh views: draw them from this recipe
    skip_bad: bool = False


class StudentStream(IterableDataset):
    """Endless batches of one split, deterministic in (seed, rank, workers); use DataLoader(batch_size=None)."""

    def __init__(self, shards: list[Shard], store_path: str | None, spec: StreamSpec, batch_size: int,
                 rank: int = 0, world_size: int = 1, start_batch: int = 0):
        if not shards:
            raise ValueError("a training split has no shards")
        if store_path is None and spec.fresh_views is None:
            raise ValueError("without a teacher store, views must be drawn fresh (teacher.online_views: fresh)")
        self.shards = shards
        self.store_path = store_path
        self.spec = spec
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.start_batch = start_batch
        self.bad_rows: frozenset[int] = frozenset()
        self._last_read: tuple[int, list[dict], ShardRows | None] | None = None
        if store_path is not None:
            store = TeacherStore.open(store_path)
            if rank == 0:  # one full check before training; every later read is checked again
                store.require_intact(shards)
            self.bad_rows = store.bad_rows(shards)

    def _consumer(self) -> tuple[int, int, int, int]:
        """(consumer id, consumer count, logical worker id, worker count).

        DataLoader asks worker 0 first, also after a resume at batch s; so physical worker w plays the
        stream of logical worker (w + s) mod W, whose turn global batch s is.
        """
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        logical = (worker + self.start_batch) % workers
        return self.rank * workers + logical, self.world_size * workers, logical, workers

    def epoch_plan(self, epoch: int, consumer: int, consumers: int) -> list[tuple[int, np.ndarray]]:
        """This consumer's (shard index, sample positions) for one epoch, in order; bad rows left out."""
        order = np.random.default_rng([self.spec.seed, epoch]).permutation(len(self.shards))
        plan = []
        stride_samples = len(self.shards) < consumers
        mine = order if stride_samples else order[consumer::consumers]
        seen = 0
        for index in mine:
            shard = self.shards[index]
            positions = np.random.default_rng([self.spec.seed, epoch, shard.first_row]).permutation(shard.count)
            if stride_samples:
                keep = (seen + np.arange(shard.count)) % consumers == consumer
                seen += shard.count
                positions = positions[keep]
            positions = np.array([p for p in positions if shard.first_row + p not in self.bad_rows], dtype=int)
            if len(positions):
                plan.append((int(index), positions))
        return plan

    def __iter__(self) -> Iterator[dict]:
        consumer, consumers, worker, workers = self._consumer()
        skip_batches = max(0, (self.start_batch - worker + workers - 1) // workers)
        skip = skip_batches * self.batch_size
        store = TeacherStore.open(self.store_path) if self.store_path else None
        pending: list[dict] = []
        epoch = 0
        while True:
            plan = self.epoch_plan(epoch, consumer, consumers)
            if not plan:
                raise ValueError(f"consumer {consumer} of {consumers} has no samples: use fewer loader workers")
            for index, positions in plan:
                if skip >= len(positions):
                    skip -= len(positions)
                    continue
                positions, skip = positions[skip:], 0
                for item in self._shard_samples(self.shards[index], positions, epoch, store):
                    pending.append(item)
                    if len(pending) == self.batch_size:
                        yield collate(pending)
                        pending = []
            epoch += 1

    def _read_shard(self, shard: Shard, store: TeacherStore | None) -> tuple[list[dict], ShardRows | None]:
        """A shard's raw samples and store rows. The last shard read is kept: a split of one shard (a
        few-shot labelled set, passed through many times a batch) is read once, not once per epoch."""
        if self._last_read is None or self._last_read[0] != shard.first_row:
            raw = list(iter_shard(shard))
            if len(raw) != shard.count:
                raise ValueError(f"{shard.path}: {len(raw)} samples, the manifest says {shard.count}")
            self._last_read = (shard.first_row, raw, store.read_shard(shard) if store else None)
        return self._last_read[1], self._last_read[2]

    def _shard_samples(self, shard: Shard, positions: np.ndarray, epoch: int,
                       store: TeacherStore | None) -> Iterator[dict]:
        raw, rows = self._read_shard(shard, store)
        for position in positions:
            sample = parse_sample(raw[position], shard, int(position), self.spec.skip_bad)
            if sample.image is None:
                continue
            yield self._views(sample, int(position), epoch, rows)

    def _views(self, sample, position: int, epoch: int, rows: ShardRows | None) -> dict:
        spec = self.spec
        item = {"row": sample.row, "label": sample.label}
        if rows is not None:
            view = cached_view(sample.row, epoch, rows.num_views - 1, spec.seed)
            box, flip = rows.boxes[position, view], bool(rows.flips[position, view])
            if spec.cached_logits:
                item.update(rows.teacher_row(position, view))
        if spec.fresh_views is not None:
            _, height, width = sample.image.shape
            box, flip = view_params(spec.fresh_views, sample.row, 1 + epoch, width, height)
        item["images"] = render_view(sample.image, box, flip, spec.student_size)
        if spec.teacher_size is not None:
            item["teacher_images"] = render_view(sample.image, box, flip, spec.teacher_size)
        return item


def collate(items: list[dict]) -> dict:
    """Stack a list of per-sample dicts into one batch dict."""
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values)
    return out


def clean_batches(shards: list[Shard], image_size: int, batch_size: int, skip_bad: bool = False,
                  bad_rows: frozenset[int] = frozenset()) -> Iterator[dict]:
    """Every sample of `shards` once, in order, at its clean view (centre square, as at evaluation); rows in
    `bad_rows` (marked bad in the store) are left out undecoded."""
    pending = []
    for shard in shards:
        for position, raw in enumerate(iter_shard(shard)):
            if shard.first_row + position in bad_rows:
                continue
            sample = parse_sample(raw, shard, position, skip_bad)
            if sample.image is None:
                continue
            _, height, width = sample.image.shape
            box, flip = view_params(ViewRecipe(), sample.row, CLEAN_VIEW, width, height)
            pending.append({"row": sample.row, "label": sample.label,
                            "images": render_view(sample.image, box, flip, image_size)})
            if len(pending) == batch_size:
                yield collate(pending)
                pending = []
    if pending:
        yield collate(pending)
