"""The Triton interpreter, less one repeated step (tests only; the package runs it unchanged).

Triton 3.9's interpreter patches the language modules a kernel's module sees (`tl`, `tl.core`) when
the kernel's grid starts, and undoes that when the grid ends. It patches them again at every call
of a `@triton.jit` helper inside the kernel (ours, and Triton's own, such as `tl.max`, whose module
sees `tl.core`), and drops what that call returns, so such a patch is never undone. Once a module
is patched, patching it again changes nothing: the builtins it looks for were replaced already
(it finds that out by scanning every member of `tl`, `tl.math` and `tl.tensor`), and the rest it sets
to what is set. That scan was most of an interpreted kernel's time in this suite (a profile of one
of test_frames_triton's tile tests: 32,142 patches, 41.7 of 69 s), so `install` skips a helper's
patch where the running grid's patch, or an earlier helper's, covers the modules its module sees.
tests/core/test_interpreter_shim.py checks that kernels give the same bits with and without it.
"""

import inspect

import triton.language as tl
from triton.runtime import interpreter

_patch_lang = interpreter._patch_lang  # the interpreter's own
_grids: list = []          # the language modules each running grid has patched, innermost last
_kept: set = set()         # those a helper's call patched: the interpreter never undoes them
_langs_of: dict = {}       # function -> the language modules its module sees
skipped = 0                # helper patches skipped (the shim's test reads it)


def _langs(fn) -> frozenset:
    """The modules `_patch_lang(fn)` patches: tl and tl.core where fn's module sees them."""
    if fn not in _langs_of:
        _langs_of[fn] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
    return _langs_of[fn]


def _patch_lang_once(fn):
    global skipped
    langs = _langs(fn)
    if _grids:  # a helper called inside a running grid: the interpreter drops the scope it gets
        if langs and langs <= _grids[-1] | _kept:  # (none: the interpreter says so)
            skipped += 1
            return interpreter._LangPatchScope()
        _kept.update(langs)
        return _patch_lang(fn)
    scope = _patch_lang(fn)  # a grid starts; it restores the scope when it ends
    _grids.append(langs)
    undo = scope.restore

    def restore():
        _grids.pop()
        undo()

    scope.restore = restore
    return scope


def install() -> None:
    interpreter._patch_lang = _patch_lang_once


def uninstall() -> None:
    interpreter._patch_lang = _patch_lang
