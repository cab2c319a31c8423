"""A file replaced through atomic_write is the old one or the new one, never a mix, and no temporary file stays."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dho_pipeline.atomic_write import atomic_write


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt  # as a Ctrl-C in the middle of the write
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]

    with atomic_write(path) as tmp:
        tmp.write_text("new\n")
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_writers_with_names_of_their_own_do_not_share_a_temporary_file(tmp_path):
    path = tmp_path / "adapter.pt"
    with atomic_write(path, own_name=True) as first, atomic_write(path, own_name=True) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("first")
        second.write_text("second")
    assert path.read_text() == "first"  # the outer block ends last: its file is the one kept
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.pt"]


def test_the_bytes_reach_the_disk_before_the_rename_and_the_rename_before_the_block_ends(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(a).stat().st_ino)),
                                                     real_replace(a, b)))
    path = tmp_path / "last.pt"
    with atomic_write(path) as tmp:
        tmp.write_bytes(b"weights")
    written = path.stat().st_ino  # the temporary file, renamed
    assert events == [("fsync", written), ("replace", written), ("fsync", tmp_path.stat().st_ino)]


def test_a_new_store_is_on_the_disk_before_it_appears(tmp_path, monkeypatch):
    from dho_pipeline.store.zarr_store import _publish

    flushed = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(os.fstat(fd).st_ino), real_fsync(fd)))
    building = tmp_path / "store.zarr.creating-1"
    (building / "logits").mkdir(parents=True)
    for file in (building / "zarr.json", building / "logits" / "zarr.json"):
        file.write_text("{}")
    inodes = {p.stat().st_ino for p in [*building.rglob("*"), building]}
    _publish(building, tmp_path / "store.zarr")
    assert inodes <= set(flushed[:-1]) and flushed[-1] == tmp_path.stat().st_ino  # then the rename, then its folder
