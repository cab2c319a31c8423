"""Stage two with shards and store on an S3 server against local disk, in one run (issue 12).

An S3 API on 127.0.0.1 (moto's server, in its own process so that it does not share the trainer's GIL),
reached as users reach theirs: s3fs with AWS_ENDPOINT_URL and AWS_* credentials from the environment.
The data: a Fashion-MNIST slice as shards of 256 images, a random-init tiny CLIP teacher cached once
locally; the shards uploaded with `upload_shards` (what `dho make-shards SOURCE s3://...` does) and the
store copied with `copy_store` (`dho cache copy`), both timed. Then cached-DHO training through
`stages.train_student.run`, local and S3 runs alternated (--repeats each), images/s from metrics.jsonl with
the first log interval dropped; the ratio S3 / local is the number. A third variant reads the shards
through fsspec's `simplecache::` (each shard fetched once per loader worker, later epochs from local disk).
Stage one is also run into an S3 store and a local one (views/s, same teacher and shards): the write side.

A local S3 server has no network latency: this measures what dho adds on top of the storage (requests per
shard, decoding, the loader), not a cloud region's bandwidth. Loader workers (`data.num_workers`) overlap
the reads of the next shards with training, as on a real cluster.

    python benchmarks/object_store_speed.py       # writes benchmarks/object-store-speed.json
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from speed import save_random_teacher, throughput, write_config  # noqa: E402

from dho_pipeline.config import load_config  # noqa: E402
from dho_pipeline.data.shards import upload_shards, write_shards  # noqa: E402
from dho_pipeline.data.sources import FASHION_MNIST_DIR, IdxSource  # noqa: E402
from dho_pipeline.data.splits import split_source  # noqa: E402
from dho_pipeline.locations import UrlPath  # noqa: E402
from dho_pipeline.store.copy import copy_store  # noqa: E402
from stages import cache_teacher, train_student  # noqa: E402

SETTINGS = {"teacher": "dho-tiny-clip", "student": "resnet10t", "image_size": 32, "views": 4, "batch": 32,
            "workers": 2}
BUCKET = "dho-bench"


@click.command()
@click.option("--per-class", default=300, show_default=True, help="Training images per class in the slice.")
@click.option("--steps", default=80, show_default=True, help="Steps per training run.")
@click.option("--repeats", default=2, show_default=True, help="Training runs per location, alternated.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("benchmarks/object-store-speed.json"), show_default=True)
def main(per_class: int, steps: int, repeats: int, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="dho-s3-") as work, s3_server():
        results = measure(Path(work), per_class, steps, repeats)
    out.write_text(json.dumps(results, indent=1) + "\n")
    click.echo(json.dumps(results, indent=1))


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server in a child process on a free port of 127.0.0.1; AWS_* set for this process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError("moto's server did not start")
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        process.terminate()
        process.wait()


def measure(work: Path, per_class: int, steps: int, repeats: int) -> dict:
    s = {**SETTINGS, "steps": steps}
    torch.manual_seed(0)
    source = IdxSource(FASHION_MNIST_DIR)
    splits = split_source(source, shots=4, val_per_class=0, test_per_class=5, max_train_per_class=per_class, seed=1)
    manifest = write_shards(source, splits, work / "shards", shard_size=256)
    config = write_config(work, manifest.root, save_random_teacher(work, s["teacher"]), s, "cpu")
    bucket = UrlPath(f"s3://{BUCKET}")
    bucket.fs.mkdir(BUCKET)

    results: dict = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpus": os.cpu_count(),
                     "settings": s, "images": {k: len(v) for k, v in splits.items()}}
    local_store = work / "store.zarr"
    results["stage_one"] = {where: stage_one(config, store) for where, store in
                            (("local", local_store), ("s3", f"{bucket}/stage-one.zarr"))}
    results["stage_one"]["s3_vs_local_views_per_s"] = (results["stage_one"]["s3"]["views_per_s"]
                                                       / results["stage_one"]["local"]["views_per_s"])
    tick = time.perf_counter()
    upload_shards(manifest, bucket / "shards")
    results["upload_shards_s"] = time.perf_counter() - tick
    results["cache_copy"] = vars(copy_store(local_store, f"{bucket}/store.zarr", progress=False))

    where = {"local": [f"data.shards={manifest.root}", f"cache.store={local_store}"],
             "s3": [f"data.shards={bucket}/shards", f"cache.store={bucket}/store.zarr"],
             "s3_simplecache": [f"data.shards=simplecache::{bucket}/shards", f"cache.store={bucket}/store.zarr"]}
    runs: dict[str, list[dict]] = {name: [] for name in where}
    for repeat in range(repeats):
        for name, overrides in where.items():
            run_dir = work / "runs" / f"{name}-{repeat}"
            tick = time.perf_counter()
            train_student.run(load_config(config, [*overrides, f"train.out_dir={run_dir}"]))
            runs[name].append({**throughput(run_dir / "metrics.jsonl", 2 * s["batch"]),
                               "wall_s": time.perf_counter() - tick})
    results["stage_two"] = runs
    mean = {name: float(np.mean([r["images_per_s"] for r in measured])) for name, measured in runs.items()}
    results["stage_two_vs_local_images_per_s"] = {name: mean[name] / mean["local"] for name in ("s3", "s3_simplecache")}
    return results


def stage_one(config: Path, store: Path | str) -> dict:
    report = cache_teacher.run(load_config(config, [f"cache.store={store}"]))
    return {"wall_s": report.seconds, "views": report.views, "views_per_s": report.views / report.seconds}


if __name__ == "__main__":
    main()
