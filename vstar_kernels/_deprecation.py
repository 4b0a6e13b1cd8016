"""Old public spellings that keep working for one release, with a DeprecationWarning naming the new one."""

from __future__ import annotations

import importlib
import warnings


def moved(old: str, module: str, name: str):
    """`name` from `module`, for code that still spells it `old`; warns once per call site."""
    warnings.warn(f"{old} is deprecated and will be removed in the next release: use {module}.{name}",
                  DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(module), name)


_UNSET = object()


def renamed(where: str, old: str, new: str, value, current=_UNSET, default=_UNSET):
    """`value`, passed under the old keyword `old` of `where`; warns that `new` replaces it. `current` and `default`:
    the value of `new` in the call and its default; `new` given apart from its default and unlike `value` is an
    error (both spell one argument: neither may win in silence)."""
    if current is not _UNSET and current != default and current != value:
        raise TypeError(f"{where}: {old}={value!r} and {new}={current!r} are one argument, {old}= its deprecated "
                        f"spelling: give {new}= alone")
    warnings.warn(f"{where}: {old}= is deprecated and will be removed in the next release: use {new}=",
                  DeprecationWarning, stacklevel=3)
    return value
