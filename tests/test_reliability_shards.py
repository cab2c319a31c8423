"""make-shards stopped part-way (Ctrl-C, SIGTERM, an error) keeps its finished shards, and the same command
writes only the rest: the same shards as an uninterrupted run."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from dho_pipeline.cli import main
from dho_pipeline.data import shards as shards_module
from dho_pipeline.data.shards import PROGRESS, load_manifest
from dho_pipeline.data.sources import BadImage, IdxSource
from dho_pipeline.locations import location
from tests.conftest import one_line_error

pytestmark = pytest.mark.reliability

# 40 labelled, 120 unlabelled, 50 val and 100 test images in shards of 32: 2 + 4 + 2 + 4 shards
SPLIT = ["--shots", "4", "--val-per-class", "5", "--test-per-class", "10", "--max-train-per-class", "16",
         "--shard-size", "32"]
STOP_AT = 100  # the image whose read is stopped: the 60th unlabelled one, when 2 + 1 shards are finished


def make_shards(fmnist: IdxSource, out: str, *more: str):
    return CliRunner().invoke(main, ["make-shards", str(fmnist.root), out, *SPLIT, *more])


def stopped_and_continued(fmnist: IdxSource, out: str, monkeypatch: pytest.MonkeyPatch) -> list:
    """make-shards into `out` stopped by Ctrl-C at image STOP_AT, then the same command; returns the images
    the second call read."""
    stopped_at_image(fmnist, out, monkeypatch)
    reads, read = [], IdxSource.read
    monkeypatch.setattr(IdxSource, "read", lambda self, ref: reads.append(ref) or read(self, ref))
    continued = make_shards(fmnist, out)
    assert continued.exit_code == 0, continued.output
    assert not (location(out) / PROGRESS).exists()
    return reads


def stopped_at_image(fmnist: IdxSource, out: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """make-shards into `out` stopped by Ctrl-C at image STOP_AT; checks what it left and said."""
    reads, read = [], IdxSource.read

    def stopping_read(self, ref):
        reads.append(ref)
        if len(reads) == STOP_AT:
            raise KeyboardInterrupt
        return read(self, ref)

    with monkeypatch.context() as patch:
        patch.setattr(IdxSource, "read", stopping_read)
        stopped = make_shards(fmnist, out)
    assert stopped.exit_code == 130, stopped.output
    assert stopped.output.splitlines()[-1] == (f"make-shards stopped (Ctrl-C); {out} keeps every finished shard: "
                                               "the same command continues"), stopped.output
    progress = json.loads((location(out) / PROGRESS).read_text())
    assert sorted(progress["shards"]) == ["labelled-00000.tar", "labelled-00001.tar", "unlabelled-00000.tar"]
    assert not (location(out) / "manifest.json").exists()


def test_a_stopped_make_shards_continues_to_the_same_shards(fmnist, tmp_path, monkeypatch):
    assert make_shards(fmnist, str(tmp_path / "whole")).exit_code == 0
    read_again = stopped_and_continued(fmnist, str(tmp_path / "out"), monkeypatch)
    assert len(read_again) == 310 - 40 - 32  # every image but those of the 3 finished shards
    whole, out = load_manifest(tmp_path / "whole"), load_manifest(tmp_path / "out")
    assert [(s.name, s.sha256) for s in out.shards()] == [(s.name, s.sha256) for s in whole.shards()]
    out.check_files(out.shards())  # every file is the one the manifest lists


def test_a_stopped_make_shards_is_not_continued_with_other_arguments(fmnist, tmp_path, monkeypatch):
    out = tmp_path / "out"
    stopped_at_image(fmnist, str(out), monkeypatch)
    one_line_error(make_shards(fmnist, str(out), "--seed", "2"), str(out / PROGRESS), "other arguments",
                   "rerun that command")
    assert make_shards(fmnist, str(out)).exit_code == 0


def test_a_make_shards_stopped_after_a_file_that_is_no_image_still_keeps_nothing_of_it(fmnist, tmp_path, monkeypatch):
    out, read, reads, broken = tmp_path / "out", IdxSource.read, [], []

    def read_with_one_broken(self, ref):
        reads.append(ref)
        if len(reads) == 36 and not broken:
            broken.append(ref)  # the 36th image (in labelled-00001) is no image, in every call
        if ref in broken:
            raise BadImage(f"{ref}: cannot identify image file")
        if len(reads) == STOP_AT:
            raise KeyboardInterrupt
        return read(self, ref)

    monkeypatch.setattr(IdxSource, "read", read_with_one_broken)
    assert make_shards(fmnist, str(out)).exit_code == 130
    progress = json.loads((out / PROGRESS).read_text())
    assert sorted(progress["shards"]) == ["labelled-00000.tar"], "no shard cut short by the bad image is kept"
    one_line_error(make_shards(fmnist, str(out)), "1 source file", str(broken[0]), "nothing written")
    assert not list(out.iterdir())


def test_a_make_shards_stopped_after_its_manifest_is_finished_by_the_same_command(fmnist, tmp_path, monkeypatch):
    out, save = tmp_path / "out", shards_module.save_manifest

    def save_then_stop(manifest):
        save(manifest)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(shards_module, "save_manifest", save_then_stop)
        assert make_shards(fmnist, str(out)).exit_code == 130
    assert (out / "manifest.json").exists() and (out / PROGRESS).exists()
    assert make_shards(fmnist, str(out)).exit_code == 0
    assert not (out / PROGRESS).exists()
    load_manifest(out).check_files(load_manifest(out).shards())


def test_a_shard_is_on_the_disk_before_the_progress_file_lists_it(fmnist, tmp_path, monkeypatch):
    flushed, listed_unflushed = set(), []
    real_fsync, real_write_whole = os.fsync, shards_module.write_whole
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.add(os.fstat(fd).st_ino), real_fsync(fd)))

    def checked_write_whole(path, data, own_name=False):
        if path.name == PROGRESS:
            listed = json.loads(data)["shards"]
            listed_unflushed.extend(n for n in listed if (path.parent / n).stat().st_ino not in flushed)
        real_write_whole(path, data, own_name)

    monkeypatch.setattr(shards_module, "write_whole", checked_write_whole)
    assert make_shards(fmnist, str(tmp_path / "out")).exit_code == 0
    assert flushed and listed_unflushed == []
