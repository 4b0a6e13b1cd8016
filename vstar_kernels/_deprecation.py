"""Old public spellings that keep working for one release, with a DeprecationWarning naming the new one."""

from __future__ import annotations

import functools
import importlib
import inspect
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


def renamed_keywords(**new_of_old):
    """Decorator: each keyword `old` (not in the function's signature) is the deprecated spelling of the keyword
    new_of_old[old]; the old keyword's default was None, so None is not given. A call that gives it warns and passes
    its value as the new keyword; a call that also gives the new keyword, at another value (its default included), is
    an error: both spell one argument, and neither may win in silence. A call the signature does not bind raises the
    function's own error, which names it."""
    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, new in new_of_old.items():
                value = kwargs.pop(old, None)
                if value is None:  # the old keyword's default: not given
                    continue
                try:
                    given = signature.bind_partial(*args, **kwargs).arguments
                except TypeError:  # (too many positional arguments, an unknown keyword): the call's own error
                    return fn(*args, **kwargs)
                if new in given and given[new] != value:
                    raise TypeError(f"{fn.__name__}: {old}={value!r} and {new}={given[new]!r} are one argument, "
                                    f"{old}= its deprecated spelling: give {new}= alone")
                kwargs[new] = renamed(fn.__name__, old, new, value)  # (its warning at the caller's line)
            return fn(*args, **kwargs)

        return call

    return wrap
