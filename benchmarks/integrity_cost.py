"""What the integrity checks cost, as ratios measured in one run on the real code paths.

* Store: `TeacherStore.write_shard` (which digests every array) and `read_shard` (which verifies them)
  against the same zarr writes and reads without digests, on ImageNet-shaped shards: 1,000 rows,
  1 + 10 views, 1,000 classes (22 MB of fp16 logits a shard, as a real ImageNet-1k store holds).
* Shards: `iter_shard` (reads the tar whole and checks its sha256) against the same parse without the
  hash, and both against decoding the shard's images, which every stage does next.

    python benchmarks/integrity_cost.py [--shards 4] [--out benchmarks/integrity_cost.json]
"""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_iterator

from dho_pipeline.data.samples import parse_sample
from dho_pipeline.data.shards import Manifest, Shard, iter_shard, write_shards
from dho_pipeline.data.sources import FASHION_MNIST_DIR, IdxSource
from dho_pipeline.data.splits import split_source
from dho_pipeline.store.zarr_store import TeacherStore

ROWS, VIEWS, CLASSES = 1000, 11, 1000


def best_of(repeats: int, work) -> float:
    """The fastest of `repeats` timings of `work()` (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        work()
        times.append(time.perf_counter() - tick)
    return min(times)


def store_costs(work: Path, shards: int) -> dict:
    manifest = Manifest(work, [str(c) for c in range(CLASSES)], ROWS, {
        "unlabelled": [Shard("unlabelled", work / f"u-{k}.tar", k * ROWS, ROWS, "") for k in range(shards)]}, {})
    store = TeacherStore.create(work / "store.zarr", {"teacher": {"model": "bench"}, "shards": []}, manifest, VIEWS)
    rng = np.random.default_rng(0)
    rows = {"logits": rng.normal(size=(ROWS, VIEWS, CLASSES)).astype(np.float16),
            "boxes": rng.random((ROWS, VIEWS, 4), np.float32), "flips": rng.random((ROWS, VIEWS)) < 0.5,
            "labels": rng.integers(0, CLASSES, ROWS).astype(np.int16), "bad": np.zeros(ROWS, bool)}
    targets = manifest.splits["unlabelled"]

    def plain_write() -> None:
        for shard in targets:
            for name in store.checked:
                store.group[name][shard.first_row: shard.first_row + shard.count] = rows[name]

    def plain_read() -> None:
        for shard in targets:
            for name in (*store.checked, "done"):
                store.group[name][shard.first_row: shard.first_row + shard.count]

    write = best_of(3, lambda: [store.write_shard(s, **rows) for s in targets])
    bare_write = best_of(3, plain_write)
    read = best_of(3, lambda: [store.read_shard(s) for s in targets])
    bare_read = best_of(3, plain_read)
    return {"shard_mb": rows["logits"].nbytes / 1e6, "shards": shards,
            "write_shard_vs_plain_writes": write / bare_write, "read_shard_vs_plain_reads": read / bare_read,
            "checked_read_mb_per_s": shards * rows["logits"].nbytes / 1e6 / read}


def shard_costs(work: Path) -> dict:
    source = IdxSource(FASHION_MNIST_DIR)
    splits = split_source(source, shots=1, val_per_class=0, test_per_class=0, max_train_per_class=101, seed=1)
    shard = write_shards(source, splits, work / "shards", shard_size=1000).splits["unlabelled"][0]

    def unhashed() -> list[dict]:
        files = [dict(f, __url__=str(shard.path)) for f in tar_file_iterator(io.BytesIO(shard.path.read_bytes()))]
        return list(group_by_keys(files))

    checked = best_of(5, lambda: list(iter_shard(shard)))
    plain = best_of(5, unhashed)
    raw = unhashed()
    decode = best_of(3, lambda: [parse_sample(r, dataclasses.replace(shard, first_row=-1), i, False)
                                 for i, r in enumerate(raw)])
    return {"samples": shard.count, "tar_mb": shard.size / 1e6, "checked_read_vs_plain_read": checked / plain,
            "sha256_share_of_read_and_decode": (checked - plain) / (checked + decode)}


@click.command()
@click.option("--shards", default=4, show_default=True, help="ImageNet-shaped store shards to write and read.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("benchmarks/integrity_cost.json"), show_default=True)
def main(shards: int, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="dho-integrity-") as work:
        result = {"date": time.strftime("%Y-%m-%d"), "store": store_costs(Path(work), shards),
                  "shards": shard_costs(Path(work))}
    out.write_text(json.dumps(result, indent=1) + "\n")
    click.echo(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
