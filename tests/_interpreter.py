"""The Triton interpreter, less one repeated step (tests only; the package runs it unchanged).

Triton 3.9's interpreter patches the language modules a kernel's module sees (`tl`, `tl.core`:
their builtins, `tl.math`'s where it sees `tl`, the tensor classes they share) when the kernel's grid
starts, and undoes that when the grid ends. It patches again at every call of a `@triton.jit` helper
inside the kernel (ours, and Triton's own such as `tl.max`, whose module sees `tl.core`) and drops
what that returns: what the grid's patch covers, the grid's end undoes; a module no running grid
covers stays patched for good. Patching a patched module again gives equivalent values only: its
builtins were replaced already (it finds that out by scanning every member of the module, its tensor
class, `tl.math` and the tensor descriptor class), the rest gets new closures that do the same. That
scan was most of an interpreted kernel's time in this suite (a profile of one of test_frames_triton's
tile tests: 32,142 patches, 41.7 of 69 s), so `install` skips a helper's patch where the running
grid's patch, or an earlier helper's that nothing undoes, covers the modules its module sees.
tests/core/test_interpreter_shim.py checks that every skip had nothing left to patch and that kernels
give the same bits with and without the shim.
"""

import inspect

import triton.language as tl
from triton.runtime import interpreter

_patch_lang = interpreter._patch_lang          # the interpreter's own
_grid_call = interpreter.GridExecutor.__call__
_grids: list = []    # per running grid, innermost last: the modules its patch covers (None until it patches)
_kept: set = set()   # modules a helper's patch left patched for good (no running grid covered them)
_langs_of: dict = {}  # function -> (size of its module's globals, the language modules they hold)
skipped = 0          # helper patches skipped
on_skip = None       # called with the helper's function at each skip (the shim's test checks it)


def langs(fn) -> frozenset:
    """The modules `_patch_lang(fn)` patches: tl and tl.core where fn's module sees them (the
    interpreter adds names to a module the first time it rewrites one of its functions: recomputed then)."""
    size = len(fn.__globals__)
    if _langs_of.get(fn, (None,))[0] != size:
        _langs_of[fn] = size, frozenset(id(v) for v in fn.__globals__.values()
                                        if inspect.ismodule(v) and v in (tl, tl.core))
    return _langs_of[fn][1]


def _patch_lang_once(fn):
    global skipped
    seen = langs(fn)
    if _grids and _grids[-1] is None:  # the grid starting: it restores the scope when it ends
        _grids[-1] = seen
        return _patch_lang(fn)
    running = frozenset().union(*_grids)
    if _grids and seen and seen <= running | _kept:  # (none seen: the interpreter says so)
        skipped += 1
        if on_skip is not None:
            on_skip(fn)
        return interpreter._LangPatchScope()
    scope = _patch_lang(fn)  # the interpreter drops it: only the running grids' ends undo part of it
    _kept.update(seen - running)
    return scope


def _grid_call_marked(self, *args, **kwargs):
    _grids.append(None)
    try:
        return _grid_call(self, *args, **kwargs)
    finally:
        _grids.pop()


def install() -> None:
    interpreter._patch_lang = _patch_lang_once
    interpreter.GridExecutor.__call__ = _grid_call_marked


def uninstall() -> None:
    interpreter._patch_lang = _patch_lang
    interpreter.GridExecutor.__call__ = _grid_call
