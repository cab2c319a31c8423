"""Training checkpoints: written atomically, holding everything a resumed run needs to continue exactly."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from dho_pipeline.atomic_write import atomic_write
from dho_pipeline.errors import CheckpointError, disk_full, is_disk_full
from dho_pipeline.safe_load import safe_load

# What train-student writes into every checkpoint (final.pt adds alpha, beta and method).
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "rng", "config", "class_names",
                   "student_data", "store", "shards")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in `obj` (nested dicts, lists and tuples): about the size of its checkpoint."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves a half-written checkpoint.

    On any failure the temporary file is removed and the checkpoint already at `path` is kept; a full disk
    raises DiskFull naming `path` and about how many bytes the checkpoint needs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Through a Python file, a full disk surfaces as ENOSPC; torch's own writer only says "iostream error".
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            torch.save(payload, f)
    except Exception as e:  # torch may wrap the OSError
        if is_disk_full(e):
            raise disk_full(path, tensor_bytes(payload)) from e
        raise


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`; CheckpointError when it is not one that train-student wrote."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        state = safe_load(path, map_location="cpu")
    except OSError:
        raise
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {reason})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a train-student checkpoint (it holds a {type(state).__name__})")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a train-student checkpoint (it lacks {', '.join(missing)})")
    return state
