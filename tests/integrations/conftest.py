"""Where diffusers cannot be imported and VSTAR_TESTS_WITHOUT_DIFFUSERS=1 says so (run_gpu_sweep.sh sets it on a GPU
machine whose image lacks diffusers, or tqdm, which it imports), a module here whose import fails with an ImportError
is skipped, saying why, instead of being a collection error: one such error interrupts the whole session's
collection, so `pytest -m gpu tests` (the sweep's tests stage) ran nothing there. Elsewhere (`make test`, CI, which
install diffusers) such a module's ImportError stays an error: a run there must not pass by skipping."""

import functools
import os

import pytest


@functools.lru_cache(maxsize=None)
def diffusers_missing() -> str:
    """Why diffusers cannot be imported here ('' where it can); tried only once a module failed to import."""
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


class _Module(pytest.Module):
    def _getobj(self):
        try:
            return super()._getobj()
        except self.CollectError as exc:
            if isinstance(exc.__cause__, ImportError) and os.environ.get("VSTAR_TESTS_WITHOUT_DIFFUSERS") == "1" \
                    and diffusers_missing():
                pytest.skip(f"diffusers is not importable here ({diffusers_missing()}); the module's import failed: "
                            f"{type(exc.__cause__).__name__}: {exc.__cause__}", allow_module_level=True)
            raise


def pytest_pycollect_makemodule(module_path, parent):
    return _Module.from_parent(parent, path=module_path)
