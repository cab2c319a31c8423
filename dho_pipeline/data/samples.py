"""Decode shard samples with errors that name the shard and key; check each row id against the manifest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dho_pipeline.data.shards import Shard, ShardDataError, source_file
from dho_pipeline.data.views import decode_image

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "gif")


@dataclass
class Sample:
    row: int
    label: int
    image: torch.Tensor | None  # uint8 (3, H, W); None when undecodable and skipped


def parse_sample(raw: dict, shard: Shard, position: int, skip_bad: bool) -> Sample:
    """Turn a raw WebDataset sample into (row, label, image); a bad image raises or is skipped."""
    key = raw.get("__key__", "?")
    where = f"{shard.path}: sample {key!r}"
    try:
        row, label = int(raw["id"]), int(raw["cls"])
    except (KeyError, ValueError) as e:
        raise ShardDataError(f"{where}: missing or malformed 'id'/'cls' field ({e})") from None
    if shard.num_classes is not None and not 0 <= label < shard.num_classes:
        raise ShardDataError(f"{where}: class index {label}, outside the {shard.num_classes} classes (0-"
                             f"{shard.num_classes - 1}): a shard changed after make-shards, or of another class list")
    expected = shard.first_row + position
    if shard.first_row >= 0 and row != expected:
        raise ShardDataError(f"{where}: row id {row}, but the manifest puts it at row {expected}; "
                             "the shards were changed after make-shards")
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    try:
        if ext is None:
            raise ValueError(f"no image field (have {sorted(k for k in raw if not k.startswith('__'))})")
        image = decode_image(raw[ext])
    except Exception as e:
        if skip_bad:
            return Sample(row, label, None)
        origin = source_file(shard, position)
        read_from = f" (read by make-shards from {origin})" if origin else ""
        raise ShardDataError(f"{where}{read_from}: cannot decode image: {e} "
                             "(set data.on_bad_image: skip to skip and count such samples)") from None
    return Sample(row, label, image)
