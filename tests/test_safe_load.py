"""dho's weights-only loader reads the numpy RNG state whichever numpy major wrote it."""

from __future__ import annotations

import io

import numpy as np
import torch

from dho_pipeline.safe_load import safe_load


def test_an_rng_state_pickled_under_numpy_1_loads_under_numpy_2_and_back():
    buf = io.BytesIO()
    state = np.random.get_state()
    torch.save({"numpy": state}, buf, _use_new_zipfile_serialization=False)  # a plain pickle: names are bytes
    data = buf.getvalue()
    names = (b"numpy._core.multiarray", b"numpy.core.multiarray")  # numpy 2's path, numpy 1's
    current = next(name for name in names if name in data)
    for name in names:
        loaded = safe_load(io.BytesIO(data.replace(current, name)))["numpy"]
        assert loaded[0] == "MT19937" and np.array_equal(loaded[1], state[1])
