"""Splits from the literature's files, over real Fashion-MNIST images written as files: a CoOp / Tip-Adapter split
JSON with its seeded K-shot draw, an ImageNet-style 1% list; bad entries named by file and entry or line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dho_pipeline.cli import main
from dho_pipeline.data.shards import iter_shard, load_manifest
from dho_pipeline.data.split_files import fewshot_splits, read_split_file
from tests.conftest import one_line_error

CLASSES = {"trouser": 1, "bag": 8, "sneaker": 7}  # the split file's classes, label = position, and their fmnist index


def write_images(fmnist, folder: Path, fmnist_class: int, count: int, names: list[str]) -> list[Path]:
    """`count` real training images of one Fashion-MNIST class, saved under `folder` with the given file names."""
    folder.mkdir(parents=True, exist_ok=True)
    indices = np.flatnonzero(fmnist.labels["train"] == fmnist_class)[:count]
    paths = [folder / name for name in names[:count]]
    for index, path in zip(indices, paths, strict=True):
        Image.fromarray(fmnist.images["train"][index]).save(path)
    return paths


def split_tree(fmnist, root: Path) -> dict[str, list[list]]:
    """images/<class>/<k>.png under root (11 a class) and a split over them: 6 train, 3 val, 2 test a class, the
    train entries shuffled so that labels first appear out of order."""
    split: dict[str, list[list]] = {"train": [], "val": [], "test": []}
    for label, (name, fmnist_class) in enumerate(CLASSES.items()):
        paths = write_images(fmnist, root / "images" / name, fmnist_class, 11, [f"{k}.png" for k in range(11)])
        entries = [[p.relative_to(root).as_posix(), label, name] for p in paths]
        split["train"] += entries[:6]
        split["val"] += entries[6:9]
        split["test"] += entries[9:]
    random.Random(2).shuffle(split["train"])  # labels first appear as 2, 1, 0
    return split


def draw_by_hand(entries: list[list], shots: int, rng: random.Random, label_order: list[int] | None = None) -> list:
    """K entries per label: labels in order of first appearance (or `label_order`), one rng.sample per label."""
    groups: dict[int, list] = {}
    for entry in entries:
        groups.setdefault(entry[1], []).append(entry)
    return [e for label in (label_order or list(groups)) for e in rng.sample(groups[label], shots)]


def shard_samples(manifest, split: str) -> list[dict]:
    return [s for shard in manifest.splits[split] for s in iter_shard(shard)]


def test_split_file_gives_the_labelled_images_of_coops_draw(fmnist, tmp_path):
    split = split_tree(fmnist, tmp_path / "src")
    (tmp_path / "split.json").write_text(json.dumps(split))
    out = tmp_path / "shards"
    result = CliRunner().invoke(main, ["make-shards", str(tmp_path / "src"), str(out), "--split-file",
                                       str(tmp_path / "split.json"), "--shots", "2", "--seed", "3",
                                       "--shard-size", "8"])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    assert manifest.class_names == list(CLASSES)
    assert {s: manifest.split_count(s) for s in manifest.splits} == {"labelled": 6, "unlabelled": 12, "val": 6,
                                                                     "test": 6}
    rng = random.Random(3)  # CoOp: random.seed(seed), then the train draw, then val with min(K, 4) shots
    labelled, val = draw_by_hand(split["train"], 2, rng), draw_by_hand(split["val"], 2, rng)
    assert labelled != draw_by_hand(split["train"], 2, random.Random(3), label_order=[0, 1, 2]), \
        "the split must tell grouping by first appearance from grouping by label"
    taken = {tuple(e) for e in labelled}
    expected = {"labelled": labelled, "val": val, "test": split["test"],
                "unlabelled": [e for e in split["train"] if tuple(e) not in taken]}
    for name, entries in expected.items():
        samples = shard_samples(manifest, name)
        assert [s["png"] for s in samples] == [(tmp_path / "src" / e[0]).read_bytes() for e in entries], name
        assert [int(s["cls"]) for s in samples] == [e[1] for e in entries], name


def test_tip_adapter_rule_draws_val_first(fmnist, tmp_path):
    split = split_tree(fmnist, tmp_path / "src")
    (tmp_path / "split.json").write_text(json.dumps(split))
    class_names, parts = read_split_file(tmp_path / "split.json", tmp_path / "src")
    rng = random.Random(1)  # Tip-Adapter: random.seed(1), then val with min(K, 4) shots, then train
    val, labelled = draw_by_hand(split["val"], 2, rng), draw_by_hand(split["train"], 2, rng)
    drawn = fewshot_splits(parts, class_names, shots=2, seed=1, rule="tip-adapter")
    assert [it.ref for it in drawn["val"]] == [tmp_path / "src" / e[0] for e in val]
    assert [it.ref for it in drawn["labelled"]] == [tmp_path / "src" / e[0] for e in labelled]
    coop = fewshot_splits(parts, class_names, shots=2, seed=1, rule="coop")
    assert [it.ref for it in coop["labelled"]] != [it.ref for it in drawn["labelled"]]


@pytest.mark.parametrize(("part", "index", "entry", "message"), [
    ("train", 4, ["images/bag/missing.png", 1, "bag"], "images/bag/missing.png not found under {src}"),
    ("val", 1, ["../split.json", 0, "trouser"], "../split.json is not a path under {src}"),
    ("train", 7, ["images/bag/0.png", 1, "handbag"], "label 1 is 'handbag', but {split}: train["),
    ("test", 0, ["images/bag/9.png", 5, "hat"], "label 5 has no entry in train"),
], ids=["missing", "outside", "two-names", "unknown-label"])
def test_a_bad_split_entry_is_named_by_file_and_entry(fmnist, tmp_path, part, index, entry, message):
    split = split_tree(fmnist, tmp_path / "src")
    split[part][index] = entry
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split))
    out = tmp_path / "shards"
    result = CliRunner().invoke(main, ["make-shards", str(tmp_path / "src"), str(out), "--split-file", str(path),
                                       "--shots", "1"])
    one_line_error(result, f"{path}: {part}[{index}]: " + message.format(src=tmp_path / "src", split=path))
    assert not out.exists(), "nothing may be written: no manifest, no shards"


def imagenet_tree(fmnist, root: Path) -> list[Path]:
    """train/<wnid>/<wnid>_<k>.JPEG (5 real images a class, 3 classes) and test/<wnid>/ (2 a class), as JPEG files;
    returns the training files."""
    train = []
    for c, fmnist_class in enumerate(CLASSES.values()):
        wnid = f"n0000000{c}"
        files = write_images(fmnist, root / "train" / wnid, fmnist_class, 7, [f"{wnid}_{k}.JPEG" for k in range(7)])
        (root / "test" / wnid).mkdir(parents=True)
        for file in files[5:]:
            file.rename(root / "test" / wnid / file.name)
        train += files[:5]
    return train


def test_labelled_list_picks_the_labelled_images(fmnist, tmp_path):
    train = imagenet_tree(fmnist, tmp_path / "src")
    listed = [train[7], train[0], train[13]]
    (tmp_path / "1percent.txt").write_text("".join(f"{p.name}\n" for p in listed) + "\n")
    out = tmp_path / "shards"
    result = CliRunner().invoke(main, ["make-shards", str(tmp_path / "src"), str(out), "--labelled-list",
                                       str(tmp_path / "1percent.txt"), "--val-per-class", "1"])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    assert {s: manifest.split_count(s) for s in manifest.splits} == {"labelled": 3, "unlabelled": 9, "val": 3,
                                                                     "test": 6}
    labelled = shard_samples(manifest, "labelled")
    assert [s["jpg"] for s in labelled] == [p.read_bytes() for p in listed]
    assert [int(s["cls"]) for s in labelled] == [1, 0, 2]
    training = [s["jpg"] for split in ("labelled", "unlabelled", "val") for s in shard_samples(manifest, split)]
    assert sorted(training) == sorted(p.read_bytes() for p in train), "every training image once, none lost"


@pytest.mark.parametrize(("line", "message"), [
    ("n00000001_9.JPEG", "n00000001_9.JPEG is not an image of the training folder"),
    ("n00000000_1.JPEG", "n00000000_1.JPEG is listed twice (first at line 1)"),
], ids=["unknown", "twice"])
def test_a_bad_list_line_is_named_by_file_and_line(fmnist, tmp_path, line, message):
    imagenet_tree(fmnist, tmp_path / "src")
    path = tmp_path / "1percent.txt"
    path.write_text(f"n00000000_1.JPEG\nn00000002_3.JPEG\n{line}\n")
    out = tmp_path / "shards"
    result = CliRunner().invoke(main, ["make-shards", str(tmp_path / "src"), str(out), "--labelled-list", str(path)])
    one_line_error(result, f"{path}:3: {message}")
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--split-file", "split.json"], "--split-file needs --shots K"),
    (["--split-file", "split.json", "--shots", "2", "--val-per-class", "3"],
     "--split-file does not take --val-per-class"),
    (["--labelled-list", "split.json", "--percent", "1"], "--labelled-list does not take --percent"),
    (["--shots", "1", "--class-map", "split.json"], "without --test-only, make-shards does not take --class-map"),
], ids=["split-file-without-shots", "split-file-with-val", "list-with-percent", "map-without-test-only"])
def test_options_that_do_not_go_together_are_refused(tmp_path, args, message):
    (tmp_path / "split.json").write_text("{}")
    args = [a.replace("split.json", str(tmp_path / "split.json")) for a in args]
    result = CliRunner().invoke(main, ["make-shards", str(tmp_path), str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_label_past_the_others_is_named_by_its_entry(fmnist, tmp_path):
    split = split_tree(fmnist, tmp_path / "src")
    split["train"][5] = [split["train"][5][0], 7, "hat"]  # 3 classes, 0-2: labels 3-6 have no entry
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split))
    result = CliRunner().invoke(main, ["make-shards", str(tmp_path / "src"), str(tmp_path / "shards"),
                                       "--split-file", str(path), "--shots", "1"])
    one_line_error(result, f"{path}: train must hold labels 0..C-1; labels [3, 4, 5, 6] have no entry, while ",
                   "train[5] has label 7")
