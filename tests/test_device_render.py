"""teacher.render: device: the views rendered on the teacher's device from decoded images match the loader
workers' views, pixel for pixel within 2 levels and in the teacher's top-1; on CUDA too where there is one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dho_pipeline.config import load_config
from dho_pipeline.data import teacher_views
from dho_pipeline.data.device_render import render_views
from dho_pipeline.data.samples import Sample
from dho_pipeline.data.shards import load_manifest
from dho_pipeline.data.teacher_views import TeacherViewBatches, padded_sources, views_on
from dho_pipeline.data.views import ViewRecipe, normalize, pixel_box, render_view, view_params
from dho_pipeline.store.lookup import view_recipe
from dho_pipeline.store.zarr_store import TeacherStore
from dho_pipeline.teacher.open_clip_teacher import load_teacher
from dho_pipeline.teacher.tip_adapter import teacher_features
from stages import cache_teacher
from tests.conftest import write_config

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
LEVELS = 2  # the largest difference allowed per pixel: torch's uint8 CPU kernel rounds its weights


def differences(rendered: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    assert rendered.dtype == expected.dtype == torch.uint8 and rendered.shape == expected.shape
    return (rendered.cpu().int() - expected.int()).abs()


@pytest.mark.parametrize("device", DEVICES)
def test_views_of_photo_sized_images_match_the_workers(fmnist, device):
    """Landscape and portrait 500x375 images zero-padded into one batch, downscaled crops, flips, clean views."""
    recipe = ViewRecipe(count=4)
    images, boxes, flips, expected = [], [], [], []
    for row in range(6):
        grey = Image.fromarray(fmnist.images["train"][row]).resize((500, 375) if row % 2 else (375, 500),
                                                                    Image.BICUBIC)
        image = torch.from_numpy(np.asarray(grey.convert("RGB")).copy()).permute(2, 0, 1)
        params = [view_params(recipe, row, view, image.shape[2], image.shape[1]) for view in range(5)]
        images.append(image)
        boxes.append([pixel_box(box, image.shape[2], image.shape[1]) for box, _ in params])
        flips.append([flip for _, flip in params])
        expected.append(torch.stack([render_view(image, box, flip, 224) for box, flip in params]))
    flips = torch.tensor(flips)
    assert flips.any() and not flips.all()
    rendered = render_views(padded_sources(images).to(device), torch.tensor(boxes).to(device), flips.to(device), 224)
    diff = differences(rendered, torch.stack(expected))
    assert diff.max() <= LEVELS and (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_batches_for_the_device_hold_the_workers_views(shards_dir, device):
    """Decoded sources from loader workers (shared memory) render to the views the workers render themselves;
    rows, labels, boxes and flips are the same, and a bad image's views are zeros either way."""
    manifest = load_manifest(shards_dir)
    shards = manifest.splits["labelled"][:1] + manifest.splits["unlabelled"][:2]

    def batches(workers: int, on_device: bool) -> list[dict]:
        dataset = TeacherViewBatches(shards, ViewRecipe(count=3), 24, 4 * 7, render_on_device=on_device)
        loaded = DataLoader(dataset, batch_size=None, num_workers=workers)
        return sorted(loaded, key=lambda batch: (batch["shard"], batch["rows"][0]))

    rendered, decoded = batches(0, on_device=False), batches(2, on_device=True)
    assert len(rendered) == len(decoded) > len(shards)
    for one, other in zip(rendered, decoded, strict=True):
        assert "images" not in other and other["sources"].shape == (len(one["rows"]), 28, 28, 3)
        assert all(np.array_equal(other[key], one[key]) for key in ("rows", "labels", "boxes", "flips", "bad"))
        assert differences(views_on(other, torch.device(device), 24), one["images"]).max() <= LEVELS

    dataset = TeacherViewBatches(shards, ViewRecipe(count=3), 24, 8, render_on_device=True)
    skipped = dataset._collate(0, [dataset._render(Sample(0, 0, None), [0, 1], None)], None)
    assert not views_on(skipped, torch.device(device), 24).any()


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_top1_on_device_views_agrees_with_the_workers_views(shards_dir, trained_teacher_file, tmp_path,
                                                                   device):
    """The check the setting stands on: the (briefly pretrained) teacher's top-1 on >= 99% of 1,440 views."""
    cfg = load_config(write_config(tmp_path / "p.yaml", shards_dir, trained_teacher_file, views={"count": 8}))
    manifest = load_manifest(shards_dir)
    teacher = load_teacher(cfg.teacher, manifest.class_names, torch.device(device))
    shards = manifest.splits["labelled"] + manifest.splits["unlabelled"]

    def logits(on_device: bool) -> torch.Tensor:
        dataset = TeacherViewBatches(shards, view_recipe(cfg), teacher.image_size, 256, render_on_device=on_device)
        views = (views_on(b, torch.device(device), teacher.image_size) for b in DataLoader(dataset, batch_size=None))
        return torch.cat([teacher.logits(normalize(v.flatten(0, 1), teacher.mean, teacher.std)).cpu() for v in views])

    workers, on_device = logits(False), logits(True)
    agreement = (workers.argmax(1) == on_device.argmax(1)).float().mean().item()
    print(f"views rendered on {device} vs by the workers, {len(workers)} views: top-1 agreement {agreement:.4f}, "
          f"largest logit difference {(workers - on_device).abs().max():.3f}")
    assert len(workers) > 1000 and agreement >= 0.99


def test_adapter_features_from_device_views_match_the_workers(shards_dir, teacher_file, tmp_path, monkeypatch):
    """Tip-Adapter's keys come from views too: rendered on the device they give the same features and labels."""
    rendered = []
    monkeypatch.setattr(teacher_views, "render_views", lambda *args: rendered.append(1) or render_views(*args))
    cfg = load_config(write_config(tmp_path / "p.yaml", shards_dir, teacher_file))
    manifest = load_manifest(shards_dir)
    teacher = load_teacher(cfg.teacher, manifest.class_names, torch.device("cpu"))
    features = {on_device: teacher_features(teacher, manifest.splits["labelled"], view_recipe(cfg), [4, 5],
                                            torch.device("cpu"), render_on_device=on_device)
                for on_device in (False, True)}
    (workers, labels), (on_device, device_labels) = features[False], features[True]
    assert torch.equal(labels, device_labels) and workers.shape == on_device.shape == (len(labels), 2, workers.shape[2])
    assert (workers * on_device).sum(-1).min() > 0.999  # unit vectors: cosine similarity
    assert rendered, "the device rendered the views"


def test_stage_one_rendering_on_device_fills_the_same_store(cached_store, shards_dir, teacher_file, tmp_path):
    """teacher.render is how, not what: the same fingerprint (a store either way serves the same students), the same
    boxes, flips and labels, logits within the few levels' difference."""
    config = write_config(tmp_path / "p.yaml", shards_dir, teacher_file, teacher={"render": "device"},
                          data={"num_workers": 2})
    report = cache_teacher.run(load_config(config))
    assert report.views and report.path.name == cached_store.name
    manifest = load_manifest(shards_dir)
    stores = TeacherStore.open(report.path), TeacherStore.open(cached_store)
    for shard in manifest.shards():
        on_device, workers = (store.read_shard(shard) for store in stores)
        assert on_device.done.all()
        for key in ("boxes", "flips", "labels"):
            np.testing.assert_array_equal(getattr(on_device, key), getattr(workers, key))
        np.testing.assert_allclose(on_device.logits.astype(np.float32), workers.logits.astype(np.float32), atol=0.05)
