"""Stage one's input: per shard, batches of every image's clean view + K random views, with their boxes.

The loader workers render the views (`teacher.render: workers`), or only decode the images and leave the
crops to the teacher's device (`teacher.render: device`, see device_render.py); `views_on` gives the views
on the device either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dho_pipeline.data.device_render import render_views
from dho_pipeline.data.samples import parse_sample
from dho_pipeline.data.shards import Shard, iter_shard
from dho_pipeline.data.views import ViewRecipe, pixel_box, render_view, view_params
from dho_pipeline.errors import warn

EVAL_SPLITS = ("val", "test")


def views_for_split(split: str, recipe: ViewRecipe) -> int:
    """Views computed per image: clean + K for training splits, the clean view alone for val and test."""
    return 1 if split in EVAL_SPLITS else 1 + recipe.count


class TeacherViewBatches(IterableDataset):
    """Yields dicts of one shard's samples in fixed batches (independent of workers and restarts).

    Worker w of W takes shards w, w + W, ...; use with `DataLoader(batch_size=None)`. `view_ids` replaces
    the per-split default views (e.g. extra augmented views for fitting an adapter). A batch holds its
    rendered "images" (N, V, 3, S, S), or with `render_on_device` its decoded "sources" (N, H, W, 3),
    zero-padded to the batch's largest image, and each view's "pixel_boxes" (N, V, 4).
    """

    def __init__(self, shards: list[Shard], recipe: ViewRecipe, image_size: int, images_per_batch: int,
                 skip_bad: bool = False, view_ids: list[int] | None = None, render_on_device: bool = False):
        self.shards = shards
        self.view_ids = view_ids
        self.recipe = recipe
        self.image_size = image_size
        self.images_per_batch = images_per_batch
        self.skip_bad = skip_bad
        self.render_on_device = render_on_device

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
            if not pending:
                rows = min(per_batch, shard.count - position) if shard.count > 0 else per_batch  # a short last batch
                if not self.render_on_device:
                    images = batch_buffer((rows, len(views), 3, self.image_size, self.image_size))
            sample = parse_sample(raw, shard, position, self.skip_bad)
            pending.append(self._render(sample, views, None if images is None else images[len(pending)]))
            if len(pending) == rows:
                yield self._collate(index, pending, images)
                pending = []
        if pending:
            yield self._collate(index, pending, None if images is None else images[: len(pending)])

    def _render(self, sample, views: list[int], out: torch.Tensor | None) -> dict:
        """Render the sample's views into `out` (V, 3, S, S), or keep the image and each view's box in whole
        pixels for the device (`out` None); a skipped bad image renders zeros."""
        boxes = np.zeros((len(views), 4), np.float32)
        flips = np.zeros(len(views), bool)
        pixels = np.tile(np.array([0, 0, 1, 1], np.int32), (len(views), 1))  # a bad image: one pixel of padding
        if sample.image is not None:
            _, height, width = sample.image.shape
            for v, view in enumerate(views):
                boxes[v], flips[v] = view_params(self.recipe, sample.row, view, width, height)
                if out is None:
                    pixels[v] = pixel_box(boxes[v], width, height)
        item = {"row": sample.row, "label": sample.label, "bad": sample.image is None, "boxes": boxes, "flips": flips}
        if out is None:
            return item | {"image": sample.image, "pixel_boxes": pixels}
        if sample.image is None:
            out.zero_()
        else:
            for v in range(len(views)):
                out[v] = render_view(sample.image, boxes[v], bool(flips[v]), self.image_size)
        return item

    @staticmethod
    def _collate(index: int, items: list[dict], images: torch.Tensor | None) -> dict:
        batch = {
            "shard": index,
            "rows": np.array([it["row"] for it in items]),
            "labels": np.array([it["label"] for it in items], np.int16),
            "bad": np.array([it["bad"] for it in items]),
            "boxes": np.stack([it["boxes"] for it in items]),
            "flips": np.stack([it["flips"] for it in items]),
        }
        if images is not None:
            return batch | {"images": images}
        return batch | {"sources": padded_sources([it["image"] for it in items]),
                        "pixel_boxes": torch.from_numpy(np.stack([it["pixel_boxes"] for it in items]))}


def padded_sources(images: list[torch.Tensor | None]) -> torch.Tensor:
    """Decoded uint8 images (3, H, W) (None: a bad one) in one (N, H_max, W_max, 3) batch, zero-padded.

    Channels last, as decoders lay images out: each image is copied row by row, not transposed.
    """
    height = max((im.shape[1] for im in images if im is not None), default=1)
    width = max((im.shape[2] for im in images if im is not None), default=1)
    sources = batch_buffer((len(images), height, width, 3))
    for out, image in zip(sources, images, strict=True):
        h, w = (0, 0) if image is None else image.shape[1:]
        if image is not None:
            out[:h, :w] = image.permute(1, 2, 0)
        out[:h, w:] = 0
        out[h:] = 0
    return sources


def warn_if_rendering_on_cpu(render: str, device: torch.device, workers: int) -> None:
    """teacher.render: device on the CPU works, in one process: say it is slower than the workers."""
    if render == "device" and device.type == "cpu":
        where = f"the {workers} loader workers" if workers else "loader workers"
        warn(f"teacher.render: device on the CPU renders every view in this one process instead of {where}: "
             "slower than teacher.render: workers here")


def views_on(batch: dict, device: torch.device, size: int) -> torch.Tensor:
    """A batch's uint8 views (N, V, 3, S, S) on `device`: moved there, or rendered there from its sources.

    Every copy is queued (non_blocking): a blocking one would wait for the teacher's work on the last batch.
    """
    if "images" in batch:
        return batch["images"].to(device, non_blocking=True)
    sources, boxes, flips = (torch.as_tensor(batch[key]).to(device, non_blocking=True)
                             for key in ("sources", "pixel_boxes", "flips"))
    return render_views(sources, boxes, flips, size)


def batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor to render a batch into; inside a loader worker it is allocated in shared
    memory, so it reaches the main process without the copy (and the per-image stack) a worker's tensor costs.

    torch's own default_collate allocates its worker batches the same way.
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
