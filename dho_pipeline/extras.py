"""Optional packages (pyproject extras): a missing one is a one-line error naming the extra that installs it."""

from __future__ import annotations

import importlib

from dho_pipeline.errors import DhoError


class MissingExtra(DhoError, ImportError):
    """A feature needs a package of an optional extra that is not installed; the message names the extra."""


def require_extra(extra: str, feature: str, *modules: str) -> None:
    """Import `modules`, or raise MissingExtra saying that `feature` needs them and how to install `extra`."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtra(f"{feature} needs {' and '.join(missing)} (the {extra!r} extra), not installed here: "
                           f"pip install -e '.[{extra}]' in the dho repository")
