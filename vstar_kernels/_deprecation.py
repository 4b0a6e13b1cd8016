"""Old public spellings that keep working for one release, with a DeprecationWarning naming the new one."""

from __future__ import annotations

import importlib
import warnings


def moved(old: str, module: str, name: str):
    """`name` from `module`, for code that still spells it `old`; warns once per call site."""
    warnings.warn(f"{old} is deprecated and will be removed in the next release: use {module}.{name}",
                  DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(module), name)


def renamed(where: str, old: str, new: str, value):
    """`value`, passed under the old keyword `old` of `where`; warns that `new` replaces it."""
    warnings.warn(f"{where}: {old}= is deprecated and will be removed in the next release: use {new}=",
                  DeprecationWarning, stacklevel=3)
    return value
