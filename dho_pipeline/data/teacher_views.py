"""Stage one's input: per shard, batches of every image's clean view + K random views, with their boxes."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dho_pipeline.data.samples import parse_sample
from dho_pipeline.data.shards import Shard, iter_shard
from dho_pipeline.data.views import ViewRecipe, render_view, view_params

EVAL_SPLITS = ("val", "test")


def views_for_split(split: str, recipe: ViewRecipe) -> int:
    """Views computed per image: clean + K for training splits, the clean view alone for val and test."""
    return 1 if split in EVAL_SPLITS else 1 + recipe.count


class TeacherViewBatches(IterableDataset):
    """Yields dicts of one shard's samples in fixed batches (independent of workers and restarts).

    Worker w of W takes shards w, w + W, ...; use with `DataLoader(batch_size=None)`. `view_ids` replaces
    the per-split default views (e.g. extra augmented views for fitting an adapter).
    """

    def __init__(self, shards: list[Shard], recipe: ViewRecipe, image_size: int, images_per_batch: int,
                 skip_bad: bool = False, view_ids: list[int] | None = None):
        self.shards = shards
        self.view_ids = view_ids
        self.recipe = recipe
        self.image_size = image_size
        self.images_per_batch = images_per_batch
        self.skip_bad = skip_bad

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index in range(worker, len(self.shards), workers):
            yield from self._shard_batches(index)

    def _shard_batches(self, index: int) -> Iterator[dict]:
        shard = self.shards[index]
        views = self.view_ids or list(range(views_for_split(shard.split, self.recipe)))
        per_batch = max(1, self.images_per_batch // len(views))
        images, pending = None, []
        for position, raw in enumerate(iter_shard(shard)):
            if images is None:
                rows = min(per_batch, shard.count - position) if shard.count > 0 else per_batch  # a short last batch
                images = batch_buffer((rows, len(views), 3, self.image_size, self.image_size))
            sample = parse_sample(raw, shard, position, self.skip_bad)
            pending.append(self._render(sample, views, images[len(pending)]))
            if len(pending) == len(images):
                yield self._collate(index, pending, images)
                images, pending = None, []
        if pending:
            yield self._collate(index, pending, images[: len(pending)])

    def _render(self, sample, views: list[int], out: torch.Tensor) -> dict:
        """Render the sample's views into `out` (V, 3, S, S); a skipped bad image leaves zeros."""
        boxes = np.zeros((len(views), 4), np.float32)
        flips = np.zeros(len(views), bool)
        if sample.image is None:
            out.zero_()
        else:
            _, height, width = sample.image.shape
            for v, view in enumerate(views):
                boxes[v], flips[v] = view_params(self.recipe, sample.row, view, width, height)
                out[v] = render_view(sample.image, boxes[v], bool(flips[v]), self.image_size)
        return {"row": sample.row, "label": sample.label, "bad": sample.image is None, "boxes": boxes,
                "flips": flips}

    @staticmethod
    def _collate(index: int, items: list[dict], images: torch.Tensor) -> dict:
        return {
            "shard": index,
            "rows": np.array([it["row"] for it in items]),
            "labels": np.array([it["label"] for it in items], np.int16),
            "bad": np.array([it["bad"] for it in items]),
            "images": images,
            "boxes": np.stack([it["boxes"] for it in items]),
            "flips": np.stack([it["flips"] for it in items]),
        }


def batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor to render a batch into; inside a loader worker it is allocated in shared
    memory, so it reaches the main process without the copy (and the per-image stack) a worker's tensor costs.

    torch's own default_collate allocates its worker batches the same way.
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
