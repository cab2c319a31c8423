"""Shared fixtures: a small real slice of Fashion-MNIST as shards, and a tiny open_clip teacher file."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from dho_pipeline.config import load_config
from dho_pipeline.shards import write_shards
from dho_pipeline.sources import FASHION_MNIST_DIR, IdxSource
from dho_pipeline.splits import split_source
from dho_pipeline.teacher import register_model_configs

SHARD_SIZE = 32


@pytest.fixture(scope="session")
def fmnist() -> IdxSource:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist (see README)")
    return IdxSource(FASHION_MNIST_DIR)


@pytest.fixture(scope="session")
def shards_dir(fmnist: IdxSource, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 shots per class, 16 train images per class, 5 val and 10 test per class: 430 images, 32 per shard."""
    out = tmp_path_factory.mktemp("shards")
    splits = split_source(fmnist, shots=4, val_per_class=5, test_per_class=10, max_train_per_class=16, seed=1)
    write_shards(fmnist, splits, out, shard_size=SHARD_SIZE)
    return out


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny CLIP, saved as a state dict and loaded back through open_clip's file path."""
    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("dho-tiny-clip")
    path = tmp_path_factory.mktemp("teacher") / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return path


def write_config(path: Path, shards: Path, teacher_file: Path, **sections: dict) -> Path:
    """A pipeline.yaml for the test slice; `sections` override single keys per section."""
    doc = {
        "data": {"shards": str(shards), "num_workers": 0},
        "teacher": {"model": "dho-tiny-clip", "pretrained": str(teacher_file), "templates": "fashion-mnist",
                    "batch_size": 64},
        "views": {"count": 3, "seed": 0},
        "cache": {"root": str(path.parent / "cache")},
    }
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(doc))
    load_config(path)  # fail here, not later, if the test wrote a bad config
    return path


@pytest.fixture(scope="session")
def trained_teacher_file(fmnist: IdxSource, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's tiny CLIP, pretrained for 5 epochs on 2,000 training images: far better than chance, not perfect."""
    from dho_pipeline.templates import TEMPLATES
    from dho_pipeline.tiny_clip import pretrain_tiny_clip

    images, labels = fmnist.images["train"][-2000:], fmnist.labels["train"][-2000:]
    path = tmp_path_factory.mktemp("trained-teacher") / "tiny-clip-trained.pt"
    return pretrain_tiny_clip(images, labels, fmnist.class_names, TEMPLATES["fashion-mnist"], path, epochs=5,
                              batch_size=64, progress=False)
