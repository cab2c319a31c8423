"""Test-only sets of some training classes under other folder names (ImageNet-R / -A / -Sketch / -V2 style), made
from real Fashion-MNIST test images, and a student scored on them with its heads restricted to their classes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dho_pipeline.cli import main
from dho_pipeline.config import load_config
from dho_pipeline.data.shards import ShardDataError, iter_shard, load_manifest
from dho_pipeline.data.student_stream import clean_batches
from dho_pipeline.student.evaluation import head_outputs
from dho_pipeline.student.from_checkpoint import load_student
from stages import evaluate as evaluate_stage
from stages import train_student
from tests.conftest import one_line_error
from tests.test_stage_two import train_config

RENAMED = {"boots": "ankle boot", "tops": "t-shirt", "sacks": "bag"}  # folder -> training class


def ood_tree(fmnist, root: Path, folders: dict[str, str], per_class: int = 8) -> Path:
    """root/<folder>/<k>.png: `per_class` real test images of each folder's Fashion-MNIST class."""
    for folder, class_name in folders.items():
        (root / folder).mkdir(parents=True)
        label = fmnist.class_names.index(class_name)
        for k, index in enumerate(np.flatnonzero(fmnist.labels["test"] == label)[-per_class:]):
            Image.fromarray(fmnist.images["test"][index]).save(root / folder / f"{k}.png")
    return root


def make_test_only(source: Path, out: Path, train_shards: Path, *extra: str):
    return CliRunner().invoke(main, ["make-shards", str(source), str(out), "--test-only", "--train-shards",
                                     str(train_shards), *extra])


def accuracy_over(scores: np.ndarray, labels: np.ndarray, classes: list[int]) -> float:
    """Top-1 when only the columns of `classes` compete."""
    return float((np.array(classes)[scores[:, classes].argmax(1)] == labels).mean())


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_a_renamed_subset_is_scored_over_its_classes(fmnist, shards_dir, cached_store, teacher_file, tmp_path):
    ood = ood_tree(fmnist, tmp_path / "ood", RENAMED)
    (tmp_path / "map.json").write_text(json.dumps(RENAMED))
    result = make_test_only(ood, tmp_path / "ood-shards", shards_dir, "--class-map", str(tmp_path / "map.json"))
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "ood-shards")
    assert manifest.class_names == load_manifest(shards_dir).class_names
    assert manifest.info["covers"] == ["t-shirt", "bag", "ankle boot"]  # in training order
    assert {s: manifest.split_count(s) for s in manifest.splits} == {"labelled": 0, "unlabelled": 0, "val": 0,
                                                                     "test": 24}
    assert sorted(p.name for p in (tmp_path / "ood-shards").iterdir()) == ["manifest.json", "sources.json",
                                                                            "test-00000.tar"]
    samples = list(iter_shard(manifest.splits["test"][0]))
    assert sorted(int(s["cls"]) for s in samples) == [0] * 8 + [8] * 8 + [9] * 8

    run = train_student.run(load_config(train_config(tmp_path, shards_dir, teacher_file, cached_store, steps=4)))
    cli = CliRunner().invoke(main, ["evaluate", str(run / "final.pt"), "--shards",
                                    f"renamed={tmp_path / 'ood-shards'}", "--json", "--device", "cpu"])
    assert cli.exit_code == 0, cli.output
    reported = json.loads(cli.output)
    assert {k: v for k, v in reported.items() if k != "extra"} == {
        k: v for k, v in evaluate_stage.run(run / "final.pt", device="cpu").items() if k != "extra"}, \
        "an extra set must not change the report on the run's own test split"

    student = load_student(run / "final.pt", torch.device("cpu"))
    out = head_outputs(student.model, clean_batches(manifest.splits["test"], student.data.image_size, 64),
                       student.data, torch.device("cpu"))
    ce, kd, labels = out.ce.numpy(), out.kd.numpy(), out.labels.numpy()
    classes = [0, 8, 9]
    cfg = student.checkpoint["config"]["eval"]

    def combined(alpha: float, beta: float) -> float:  # the heads with the other seven classes taken out
        p = alpha * softmax(ce[:, classes]) + (1 - alpha) * softmax(kd[:, classes] / beta)
        return float((np.array(classes)[p.argmax(1)] == labels).mean())

    by_hand = {"ce_head": accuracy_over(ce, labels, classes), "kd_head": accuracy_over(kd, labels, classes),
               "combined_default": combined(cfg["default_alpha"], cfg["default_beta"]),
               "combined_searched": combined(reported["alpha"], reported["beta"]), "images": 24, "classes": 3}
    assert reported["extra"]["renamed"] == pytest.approx(by_hand)
    every_class = [accuracy_over(head, labels, list(range(10))) for head in (ce, kd)]
    assert every_class != [by_hand["ce_head"], by_hand["kd_head"]], \
        "the student must predict classes outside the set, or the restriction is not tested"


def test_folders_named_as_training_classes_need_no_map_and_a_text_map_renames(fmnist, shards_dir, tmp_path):
    named = ood_tree(fmnist, tmp_path / "named", {"bag": "bag", "sneaker": "sneaker"}, per_class=2)
    assert make_test_only(named, tmp_path / "a", shards_dir).exit_code == 0
    assert load_manifest(tmp_path / "a").info["covers"] == ["sneaker", "bag"]
    renamed = ood_tree(fmnist, tmp_path / "renamed", RENAMED, per_class=2)
    (tmp_path / "map.txt").write_text("# folder, training class\nboots ankle boot\ntops\tt-shirt\nsacks bag\n"
                                      "hats hat\n")  # no folder hats: its line is not used
    assert make_test_only(renamed, tmp_path / "b", shards_dir, "--class-map", str(tmp_path / "map.txt")).exit_code == 0
    assert [int(s["cls"]) for s in iter_shard(load_manifest(tmp_path / "b").splits["test"][0])] == \
        [9, 9, 8, 8, 0, 0]  # folders boots, sacks, tops in name order


@pytest.mark.parametrize(("map_text", "message"), [
    (None, "{ood}/boots: folder name: 'boots' is not a training class of {manifest}; give --class-map FILE"),
    ("boots ankle boot\ntops t-shirt\n", "{ood}/sacks: no entry for this folder in {map}"),
    ("boots ankle boot\ntops t-shirt\nsacks handbag\n", "{map}:3: 'handbag' is not a training class of {manifest}"),
], ids=["no-map", "folder-not-in-map", "not-a-class"])
def test_a_folder_that_maps_onto_no_training_class_is_named(fmnist, shards_dir, tmp_path, map_text, message):
    ood = ood_tree(fmnist, tmp_path / "ood", RENAMED, per_class=1)
    extra = []
    if map_text is not None:
        (tmp_path / "map.txt").write_text(map_text)
        extra = ["--class-map", str(tmp_path / "map.txt")]
    result = make_test_only(ood, tmp_path / "out", shards_dir, *extra)
    one_line_error(result, message.format(ood=ood, map=tmp_path / "map.txt", manifest=shards_dir / "manifest.json"))
    assert not (tmp_path / "out").exists()


def test_a_set_with_the_students_classes_in_another_order_says_so(shards_dir):
    names = load_manifest(shards_dir).class_names
    order = f"has the student's 10 classes in another order (index 0: {names[0]!r}, the student's {names[-1]!r}); "
    with pytest.raises(ShardDataError, match=re.escape(order + "make the set with --test-only")):
        evaluate_stage.extra_set("odd", str(shards_dir), names[::-1])
    with pytest.raises(ShardDataError, match=re.escape("has other classes than the student (10 against 9)")):
        evaluate_stage.extra_set("odd", str(shards_dir), names[:9])
