"""Stage one's CPU side alone: `TeacherViewBatches` over ImageNet-sized JPEGs, in-process and through loader
workers, against the same class at another commit, or against its own decode-only batches (what the workers do
for `teacher.render: device`), in one run.

The source is made here as in benchmarks/speed.py (500x375 JPEGs at quality 90, upscaled from Fashion-MNIST).
The versions take turns, `--repeats` times each; the JSON gives every views/s and the ratios of medians.

    python benchmarks/loader_speed.py --against 777c7c8 --images 1200 --workers 1 --repeats 5
    python benchmarks/loader_speed.py --decode-only --images 1200 --workers 1 --repeats 5
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import click
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from speed import make_jpeg_source  # noqa: E402

from dho_pipeline.data.shards import write_shards  # noqa: E402
from dho_pipeline.data.sources import FASHION_MNIST_DIR, IdxSource  # noqa: E402
from dho_pipeline.data.splits import split_source  # noqa: E402
from dho_pipeline.data.teacher_views import TeacherViewBatches  # noqa: E402
from dho_pipeline.data.views import ViewRecipe  # noqa: E402

MODULE = "dho_pipeline/data/teacher_views.py"


@click.command()
@click.option("--against", default=None, help="A git commit whose TeacherViewBatches to compare with.")
@click.option("--decode-only", is_flag=True, help="Compare with the batches the workers make for teacher.render: "
              "device (decoded images, no views rendered).")
@click.option("--images", default=1200, show_default=True, help="JPEGs in the generated source.")
@click.option("--workers", default=1, show_default=True, help="Loader workers (0: in-process only).")
@click.option("--views", default=8, show_default=True, help="Random views per image (plus the clean one).")
@click.option("--repeats", default=5, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the JSON here.")
def main(against: str | None, decode_only: bool, images: int, workers: int, views: int, repeats: int,
         out: Path | None) -> None:
    if not (against or decode_only):
        raise click.UsageError("compare with something: --against COMMIT, --decode-only, or both")
    torch.set_num_threads(1)
    versions = {"current": TeacherViewBatches}
    if against:
        versions[against] = class_at(against)
    if decode_only:
        versions["decode_only"] = partial(TeacherViewBatches, render_on_device=True)
    with tempfile.TemporaryDirectory(prefix="dho-loader-") as work:
        source = make_jpeg_source(IdxSource(FASHION_MNIST_DIR), Path(work) / "jpegs", images)
        splits = split_source(source, shots=4, val_per_class=2, test_per_class=2, seed=1)
        shards = write_shards(source, splits, Path(work) / "shards", shard_size=250).splits["unlabelled"]
        rates: dict[str, list[float]] = {name: [] for name in versions}
        for _ in range(repeats):
            for name, batches in versions.items():
                rates[name].append(views_per_s(batches(shards, ViewRecipe(count=views), 224, 256), workers))
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "images": images, "workers": workers,
              "views_per_image": 1 + views, "views_per_s": rates}
    current = statistics.median(rates["current"])
    if against:
        result["current_vs_against"] = current / statistics.median(rates[against])
    if decode_only:
        result["decode_only_vs_current"] = statistics.median(rates["decode_only"]) / current
    text = json.dumps(result, indent=1)
    if out:
        out.write_text(text + "\n")
    click.echo(text)


def class_at(commit: str) -> type:
    """TeacherViewBatches as it was at `commit`, loaded from `git show` beside the current package."""
    code = subprocess.run(["git", "show", f"{commit}:{MODULE}"], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parents[1]).stdout
    path = Path(tempfile.gettempdir()) / f"dho_teacher_views_{commit}.py"  # one small file per commit, reused
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # loader workers unpickle the dataset by its module name
    spec.loader.exec_module(module)
    return module.TeacherViewBatches


def views_per_s(dataset, workers: int) -> float:
    """Views per second of one pass over `dataset` through `workers` loader workers."""
    tick, views = time.perf_counter(), 0
    for batch in DataLoader(dataset, batch_size=None, num_workers=workers):
        views += batch["flips"].shape[0] * batch["flips"].shape[1]
    return views / (time.perf_counter() - tick)


if __name__ == "__main__":
    main()
