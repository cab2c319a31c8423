"""Image sources that `dho make-shards` reads: an ImageFolder tree, image files listed elsewhere, or a Fashion-MNIST
idx directory."""

from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dho_pipeline.data.views import unidentified
from dho_pipeline.errors import DhoError

FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
# Debian's dataset-fashion-mnist; DHO_FASHION_MNIST names another folder of its four idx files
FASHION_MNIST_DIR = Path(os.environ.get("DHO_FASHION_MNIST") or "/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class SourceError(DhoError, ValueError):
    """A source that cannot give what was asked: a class folder without images, a class too small for the split."""


class BadImage(SourceError):
    """A source file that PIL cannot read as an image; the message names the file."""


def check_image(data: bytes, path: Path) -> None:
    """Raise BadImage unless PIL identifies `data` and its structure checks out (Image.verify).

    It reads headers and structure, not the pixels: it catches files that are no image at all and damaged PNG
    or GIF data; a truncated JPEG passes (only a full decode finds it) and is named at decode time.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except UnidentifiedImageError:
        raise BadImage(f"{path}: {unidentified(data)}") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"{path}: {e} (PIL's limit is PIL.Image.MAX_IMAGE_PIXELS)") from None
    except Exception as e:
        raise BadImage(f"{path}: damaged image ({str(e).strip() or type(e).__name__})") from None


@dataclass(frozen=True)
class Item:
    """One source image: a reference the source can read, and its class index."""

    ref: object
    label: int


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) idx file into a uint8 array: images (N, H, W) or labels (N,)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {magic:#x})")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


class IdxSource:
    """A Fashion-MNIST-style directory: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."""

    def __init__(self, root: Path, class_names: list[str] | None = None):
        self.root = Path(root)
        self.images: dict[str, np.ndarray] = {}
        self.labels: dict[str, np.ndarray] = {}
        for part, prefix in (("train", "train"), ("test", "t10k")):
            self.images[part] = read_idx(self._find(f"{prefix}-images-idx3-ubyte"))
            self.labels[part] = read_idx(self._find(f"{prefix}-labels-idx1-ubyte"))
        n_classes = int(self.labels["train"].max()) + 1
        self.class_names = class_names or (
            FASHION_MNIST_CLASSES if n_classes == 10 else [str(i) for i in range(n_classes)]
        )

    def _find(self, stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (self.root / name).exists():
                return self.root / name
        raise FileNotFoundError(f"{self.root}: missing {stem}[.gz]")

    def items(self, part: str) -> list[Item]:
        return [Item((part, i), int(y)) for i, y in enumerate(self.labels[part])]

    def read(self, ref: tuple[str, int]) -> tuple[bytes, str]:
        part, index = ref
        buf = io.BytesIO()
        Image.fromarray(self.images[part][index]).save(buf, format="PNG")
        return buf.getvalue(), "png"


def image_files(folder: Path) -> list[Path]:
    """The image files of one class folder, sorted by name (none when there is no such folder)."""
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    return [f for f in files if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]


class FileSource:
    """Image files, each read as found, under the given class names (the files come with each Item's path)."""

    def __init__(self, class_names: list[str]):
        self.class_names = list(class_names)

    def read(self, ref: Path) -> tuple[bytes, str]:
        """The file's bytes and extension; BadImage when PIL cannot read it (check_image)."""
        ext = ref.suffix.lower().lstrip(".")
        data = ref.read_bytes()
        check_image(data, ref)
        return data, "jpg" if ext == "jpeg" else ext


class ImageFolderSource(FileSource):
    """A tree with one folder per class; with `train/` and `test/` subfolders when it has them.

    Every class folder must hold at least one image: an empty one (or one of other files only) is refused,
    naming the folder, before anything is written.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.parts = {p: self.root / p for p in ("train", "test") if (self.root / p).is_dir()}
        if "train" not in self.parts:
            self.parts = {"train": self.root}
        self.class_names = sorted(d.name for d in self.parts["train"].iterdir() if d.is_dir())
        if not self.class_names:
            raise SourceError(f"{self.parts['train']}: no class folders found")
        self.files: dict[str, list[list[Path]]] = {}  # part -> class index -> its image files
        empty: list[str] = []
        for part, folder in self.parts.items():
            self.files[part] = [image_files(folder / name) for name in self.class_names]
            empty += [str(folder / name) for name, files in zip(self.class_names, self.files[part], strict=True)
                      if not files and (folder / name).is_dir()]
        if empty:
            raise SourceError(f"class folder{'s' if len(empty) > 1 else ''} without images "
                              f"({' '.join(sorted(IMAGE_SUFFIXES))}): {', '.join(empty)}; "
                              "add images or remove the folder")

    def items(self, part: str) -> list[Item]:
        return [Item(f, label) for label, files in enumerate(self.files.get(part, [])) for f in files]


def open_source(path: Path) -> IdxSource | ImageFolderSource:
    """Pick the source type from what the directory holds."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    if any(path.glob("train-images-idx3-ubyte*")):
        return IdxSource(path)
    return ImageFolderSource(path)
