"""Splits given by the literature's files: the CoOp / Tip-Adapter split JSON with its seeded K-shot draw, and the
ImageNet 1% / 10% lists of labelled images (SimCLR's `1percent.txt`, `10percent.txt`).

The K-shot draw reproduces dassl's `DatasetBase.generate_fewshot_dataset` (used by CoOp, Tip-Adapter and the DHO
reference): the entries of a part are grouped by label, the groups in the order their labels first appear in the file
and each group in file order, and each group gets `random.sample(group, K)` from one `random.Random(seed)`, group
after group. The validation part gets the same draw with min(K, 4) shots. CoOp draws train, then val, right after
`set_random_seed(cfg.SEED)` (rule `coop`); Tip-Adapter draws val, then train, right after `random.seed(1)` (rule
`tip-adapter`). The DHO reference's `train_others.py` seeds `random.seed(1)` and calls a Tip-Adapter-style
`build_dataset(name, root, shots)`; its dataset modules were not available to check, so its order is taken to be
Tip-Adapter's. So for the same seed the labelled files are theirs, as long as nothing drew from Python's `random`
between their seeding and the draw (nothing does in CoOp's `train.py` or Tip-Adapter's `main.py`) and, for CoOp,
its cached `split_fewshot/shot_K-seed_S.pkl` was made by that draw. One difference: where a class has fewer entries
than asked for, dassl repeats images (`random.choices`); dho refuses, naming the class.
"""

from __future__ import annotations

import json
import random
from pathlib import Path, PurePosixPath

from dho_pipeline.data.sources import ImageFolderSource, Item, SourceError
from dho_pipeline.data.splits import assign_splits

SPLIT_PARTS = ("train", "val", "test")
SPLIT_RULES = ("coop", "tip-adapter")
LITERATURE_VAL_SHOTS = 4  # the few-shot validation set: min(K, 4) images per class


def refuse(problems: list[str], what: str) -> None:
    """Raise one SourceError naming the first problem and how many more there are (none: return)."""
    if problems:
        n = len(problems) - 1
        more = f" (and {n} more problem{'s' * (n > 1)} in {what})" if n else ""
        raise SourceError(problems[0] + more)


def _entry(entry: object, where: str, root: Path) -> tuple[Path, int, str] | str:
    """(file, label, class name) of one split entry, or the problem with it."""
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
            and isinstance(entry[1], int) and not isinstance(entry[1], bool) and entry[1] >= 0
            and isinstance(entry[2], str)):
        return f"{where}: expected [relative path, label >= 0, class name], got {json.dumps(entry)[:120]}"
    relative = PurePosixPath(entry[0])
    if relative.is_absolute() or ".." in relative.parts:
        return f"{where}: {entry[0]} is not a path under {root}"
    file = root / relative
    if not file.is_file():
        return f"{where}: {entry[0]} not found under {root}"
    return file, entry[1], entry[2]


def read_split_file(path: Path, root: Path) -> tuple[list[str], dict[str, list[Item]]]:
    """The class names (by label) and the train / val / test Items of a split JSON over the images under `root`.

    Each entry is `[path relative to root, label, class name]`. Refused, naming the file and the entry: a missing
    file, a path leaving root, a malformed entry, a label given two names, a val / test label that train lacks,
    labels that do not run 0..C-1 in train.
    """
    path, root = Path(path), Path(root)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(p), list) for p in SPLIT_PARTS):
        raise SourceError(f"{path}: expected an object with lists 'train', 'val' and 'test' "
                          "([relative path, label, class name] each)")
    names: dict[int, tuple[str, str]] = {}  # label -> (class name, where it was first given)
    parts: dict[str, list[Item]] = {}
    problems: list[str] = []
    for part in SPLIT_PARTS:
        parts[part] = []
        for i, raw in enumerate(doc[part]):
            where = f"{path}: {part}[{i}]"
            entry = _entry(raw, where, root)
            if isinstance(entry, str):
                problems.append(entry)
                continue
            file, label, name = entry
            if part == "train":
                first, first_where = names.setdefault(label, (name, where))
                if first != name:
                    problems.append(f"{where}: label {label} is {name!r}, but {first_where} calls it {first!r}")
            elif label not in names:
                problems.append(f"{where}: label {label} has no entry in train")
            parts[part].append(Item(file, label))
    refuse(problems, str(path))
    missing = sorted(set(range(max(names, default=-1) + 1)) - set(names))
    if not names or missing:
        top = max(names, default=None)
        raise SourceError(f"{path}: train must hold labels 0..C-1; " +
                          (f"labels {missing} have no entry, while {names[top][1]} has label {top}" if missing
                           else "it has no entries"))
    return [names[label][0] for label in range(len(names))], parts


def _draw(items: list[Item], shots: int, rng: random.Random, part: str, class_names: list[str]) -> list[int]:
    """Positions in `items` of `shots` per label, drawn as dassl's generate_fewshot_dataset draws them."""
    groups: dict[int, list[int]] = {}  # in the order labels first appear, as dassl's defaultdict
    for position, item in enumerate(items):
        groups.setdefault(item.label, []).append(position)
    drawn = []
    for label, positions in groups.items():
        if len(positions) < shots:
            raise SourceError(f"class {class_names[label]!r}: {shots} {part} images asked for, only {len(positions)} "
                              "in the split file")
        drawn += rng.sample(positions, shots)
    return drawn


def fewshot_splits(parts: dict[str, list[Item]], class_names: list[str], shots: int, seed: int,
                   rule: str = "coop") -> dict[str, list[Item]]:
    """Labelled: `shots` per class from train; unlabelled: the rest of train; val: min(shots, 4) per class; test: all.

    Labelled and val come in the order drawn, unlabelled and test in file order. `rule` is the order of the two
    draws (see the module docstring).
    """
    if rule not in SPLIT_RULES:
        raise ValueError(f"rule {rule!r}: expected one of {SPLIT_RULES}")
    rng = random.Random(seed)
    val_shots = min(shots, LITERATURE_VAL_SHOTS)
    if rule == "coop":
        labelled = _draw(parts["train"], shots, rng, "train", class_names)
        val = _draw(parts["val"], val_shots, rng, "val", class_names)
    else:
        val = _draw(parts["val"], val_shots, rng, "val", class_names)
        labelled = _draw(parts["train"], shots, rng, "train", class_names)
    taken = set(labelled)
    return {
        "labelled": [parts["train"][i] for i in labelled],
        "unlabelled": [item for i, item in enumerate(parts["train"]) if i not in taken],
        "val": [parts["val"][i] for i in val],
        "test": list(parts["test"]),
    }


def read_labelled_list(path: Path, train: list[Item], folder: Path) -> list[int]:
    """Positions in `train` of the images a 1% / 10% list names (one file name a line, e.g. n01440764_10026.JPEG).

    Refused, naming the file and the line: a name that is no image of the training folder, one that names images
    in two class folders, one listed twice.
    """
    path = Path(path)
    by_name: dict[str, list[int]] = {}
    for position, item in enumerate(train):
        by_name.setdefault(item.ref.name, []).append(position)
    listed: dict[int, int] = {}  # position in train -> line number
    problems = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        where, matches = f"{path}:{number}", by_name.get(name, [])
        if not matches:
            problems.append(f"{where}: {name} is not an image of the training folder {folder}")
        elif len(matches) > 1:
            folders = ", ".join(train[i].ref.parent.name for i in matches)
            problems.append(f"{where}: {name} is an image of {len(matches)} class folders ({folders})")
        elif matches[0] in listed:
            problems.append(f"{where}: {name} is listed twice (first at line {listed[matches[0]]})")
        else:
            listed[matches[0]] = number
    refuse(problems, str(path))
    if not listed:
        raise SourceError(f"{path}: no image names in it")
    return list(listed)


def labelled_list_splits(source: ImageFolderSource, path: Path, *, val_per_class: int = 0,
                         test_per_class: int | None = None, seed: int = 1) -> dict[str, list[Item]]:
    """Labelled: the training images the list names (in list order); val and test as `assign_splits` carves them
    from the others (seeded, per class); every other training image unlabelled."""
    train = source.items("train")
    listed = read_labelled_list(path, train, source.parts["train"])
    taken = set(listed)
    rest = [item for i, item in enumerate(train) if i not in taken]
    splits = assign_splits(rest, source.items("test"), len(source.class_names), shots=0,  # no labels beyond the list
                           val_per_class=val_per_class, test_per_class=test_per_class, seed=seed,
                           class_names=source.class_names)
    return {**splits, "labelled": [train[i] for i in listed]}
