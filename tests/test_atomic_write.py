"""A file replaced through atomic_write is the old one or the new one, never a mix, and no temporary file stays."""

from __future__ import annotations

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
