"""Test-only shard sets whose class folders are a subset or a renaming of the training classes (ImageNet-R, -A,
-Sketch, -V2 and the like).

A class map says which training class each folder of the set holds, in one of two formats:

- JSON (a file ending in `.json`): an object `{"folder name": "training class name", ...}`;
- text (any other file): one folder a line, its name, white space, then the training class name, which may hold
  spaces (`n01443537 goldfish`; ImageNet's `LOC_synset_mapping.txt` has this form); blank lines and lines
  starting with `#` are skipped.

Entries for folders the set does not have are ignored, so one map can serve every set of a family. Without a map,
every folder name must be a training class name: an ImageNet set with wnid folders fits shards made from an
ImageNet tree with wnid folders; give a map where the training classes have other names, or where the folders are
numbered (ImageNet-V2: `0` .. `999` in sorted wnid order).
"""

from __future__ import annotations

import json
from pathlib import Path

from dho_pipeline.data.shards import MANIFEST, Manifest
from dho_pipeline.data.sources import FileSource, ImageFolderSource, Item, SourceError
from dho_pipeline.data.split_files import refuse


def read_class_map(path: Path) -> dict[str, tuple[str, str]]:
    """folder -> (training class name, where the map says so: `map.json: "folder"` or `map.txt:3`)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}: not a JSON file ({e})") from None
        if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
            raise SourceError(f'{path}: expected an object {{"folder name": "training class name", ...}}')
        return {folder: (name, f"{path}: {json.dumps(folder)}") for folder, name in doc.items()}
    entries: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{number}"
        fields = line.split(maxsplit=1)
        if len(fields) < 2:
            raise SourceError(f"{where}: expected a folder name, white space and a training class name")
        folder, name = fields
        if folder in entries:
            raise SourceError(f"{where}: folder {folder} is mapped again (first at {entries[folder][1]})")
        entries[folder] = (name.strip(), where)
    return entries


def ood_splits(root: Path, train: Manifest,
               class_map: Path | None = None) -> tuple[FileSource, dict[str, list[Item]], list[str]]:
    """The images of `root`'s class folders as a test split labelled with `train`'s class indices, the source to
    write them from, and the training classes the set covers (in training order).

    Every folder must map onto a training class (through `class_map`, else by its name); several folders may map
    onto one class. Refused, naming the folder or the map's line: a folder without an entry, an entry that names
    no training class.
    """
    folders = ImageFolderSource(root)
    index = {name: i for i, name in enumerate(train.class_names)}
    mapping = read_class_map(class_map) if class_map else None
    manifest = train.root / MANIFEST
    targets, problems = [], []
    for folder in folders.class_names:
        if mapping is None:
            name, where = folder, f"{folders.parts['train'] / folder}: folder name"
        elif folder in mapping:
            name, where = mapping[folder]
        else:
            problems.append(f"{folders.parts['train'] / folder}: no entry for this folder in {class_map}")
            continue
        if name not in index:
            hint = "" if mapping else "; give --class-map FILE to map the folders onto training classes"
            problems.append(f"{where}: {name!r} is not a training class of {manifest}{hint}")
        targets.append(name)
    refuse(problems, str(class_map or root))
    items = [Item(file, index[target]) for target, files in zip(targets, folders.files["train"], strict=True)
             for file in files]
    covered = set(targets)
    return FileSource(train.class_names), {"test": items}, [n for n in train.class_names if n in covered]
