"""Seeded, class-balanced splits of a source into labelled / unlabelled / val / test."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dho_pipeline.data.shards import SPLITS
from dho_pipeline.data.sources import IdxSource, ImageFolderSource, Item, SourceError


def _cap_per_class(items: list[Item], num_classes: int, cap: int | None, rng: np.random.Generator) -> list[Item]:
    """At most `cap` items per class, chosen at random (all of them when cap is None)."""
    if cap is None:
        return list(items)
    order = rng.permutation(len(items))
    seen = [0] * num_classes
    kept = []
    for i in order:
        item = items[i]
        if seen[item.label] < cap:
            seen[item.label] += 1
            kept.append(item)
    return kept


def assign_splits(
    train: list[Item],
    test: list[Item],
    num_classes: int,
    *,
    shots: int | None = None,
    percent: float | None = None,
    val_per_class: int = 0,
    test_per_class: int | None = None,
    max_train_per_class: int | None = None,
    seed: int = 1,
    class_names: Sequence[str] | None = None,
) -> dict[str, list[Item]]:
    """Split the training items per class into val, labelled (K shots or P percent) and unlabelled.

    Seeded and class-balanced. Without test items, `test_per_class` items per class are carved from the
    training pool first. Items in each split come in a seeded random order. A class with fewer images than
    the labelled split needs is refused by its name in `class_names` (by its index without them).
    """
    if (shots is None) == (percent is None):
        raise ValueError("give exactly one of shots or percent")
    rng = np.random.default_rng(seed)
    by_class: list[list[Item]] = [[] for _ in range(num_classes)]
    for item in train:
        by_class[item.label].append(item)
    splits: dict[str, list[Item]] = {s: [] for s in SPLITS}
    splits["test"] = _cap_per_class(test, num_classes, test_per_class, rng)
    for label, items in enumerate(by_class):
        order = [items[i] for i in rng.permutation(len(items))]
        if not test:
            take = test_per_class or 0
            splits["test"] += order[:take]
            order = order[take:]
        if max_train_per_class is not None:
            order = order[: max_train_per_class + val_per_class]
        splits["val"] += order[:val_per_class]
        pool = order[val_per_class:]
        n_labelled = shots if shots is not None else max(1, round(len(pool) * percent / 100))
        if n_labelled > len(pool):
            name = repr(class_names[label]) if class_names is not None else str(label)
            whole = f" of its {len(items)} training images" if len(items) != len(pool) else ""
            raise SourceError(f"class {name}: {n_labelled} labelled images asked for, only {len(pool)} available"
                              f"{whole}")
        splits["labelled"] += pool[:n_labelled]
        splits["unlabelled"] += pool[n_labelled:]
    return {name: [items[i] for i in rng.permutation(len(items))] for name, items in splits.items()}


def split_source(source: IdxSource | ImageFolderSource, **kwargs) -> dict[str, list[Item]]:
    """assign_splits on a source's train and test parts; errors name classes by their names."""
    return assign_splits(source.items("train"), source.items("test"), len(source.class_names),
                         class_names=source.class_names, **kwargs)
