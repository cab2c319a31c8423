"""torch.load for the files dho writes (checkpoints, adapters): weights only, so loading a file runs no code.

Checkpoints and adapters travel between machines and people; an unpickler that may call any global would
let a crafted file run code on load. These files hold tensors, plain Python values and the numpy RNG state
(one uint32 array), so torch's weights-only unpickler with that array's globals allowed reads all of them.
"""

from __future__ import annotations

import pickle
import re
from typing import IO, Any

import numpy as np
import torch

try:  # numpy 2 (and 1.26's stub)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 1.26
    from numpy.core.multiarray import _reconstruct

NUMPY_ARRAY_GLOBALS: list = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
if tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 6):  # (object, name) pairs since 2.6
    # A file pickled under the other numpy major names _reconstruct by the other module path.
    NUMPY_ARRAY_GLOBALS += [(_reconstruct, f"numpy.{module}.multiarray._reconstruct") for module in ("core", "_core")]
# Allowed once for the process: torch.serialization.safe_globals, a context manager over one global set, would
# drop them under a load running in another thread when it exits (loads in threads, as kill_trials.py does).
torch.serialization.add_safe_globals(NUMPY_ARRAY_GLOBALS)


def safe_load(file: str | IO[bytes], **kwargs: Any) -> Any:
    """torch.load(file, weights_only=True), with the numpy RNG state's uint32 array allowed.

    A file that would call anything else raises pickle.UnpicklingError naming what it would call.
    """
    try:
        return torch.load(file, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        called = re.search(r"GLOBAL (\S+)", str(e))
        if called is None:
            raise
        raise pickle.UnpicklingError(f"refused: loading it would call {called.group(1)}, and dho's files hold only "
                                     "tensors and plain values") from e
