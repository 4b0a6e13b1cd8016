"""`vstar-kernels comfyui-install /path/to/ComfyUI`: a custom_nodes package that loads the node from this one."""

from __future__ import annotations

import pathlib

PACKAGE = "vstar_kernels_tar"
MARK = "# Written by `vstar-kernels comfyui-install`"
SOURCE = f'''{MARK}: ComfyUI loads the VSTAR_TAR node from the vstar_kernels package.
# It must be installed in the Python environment that runs ComfyUI (pip install -e <its checkout>).
try:
    from vstar_kernels.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as exc:
    raise ImportError("the VSTAR_TAR node needs the vstar_kernels package in the Python environment that runs "
                      f"ComfyUI: pip install -e <a checkout of the vstar_kernels repository> ({{exc}})") from exc

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''


def install(comfyui: str) -> pathlib.Path:
    """Write ``<comfyui>/custom_nodes/vstar_kernels_tar/__init__.py``; returns its path.

    `comfyui` must be a ComfyUI directory (it has ``custom_nodes/``). A package of that name written
    by this command is replaced; any other file or directory there is an error.
    """
    root = pathlib.Path(comfyui).expanduser()
    nodes = root / "custom_nodes"
    if not nodes.is_dir():
        raise ValueError(f"{root} is not a ComfyUI directory: it has no custom_nodes/ folder")
    target = nodes / PACKAGE
    init = target / "__init__.py"
    if target.exists() or target.is_symlink():  # a link to nothing too
        ours = target.is_dir() and init.is_file() and init.read_bytes().startswith(MARK.encode())
        if not ours:
            raise ValueError(f"{target} exists and was not written by this command; remove it first")
        others = sorted(p.name for p in target.iterdir() if p.name not in ("__init__.py", "__pycache__"))
        if others:
            raise ValueError(f"{target} was written by this command but now holds other files too "
                             f"({', '.join(others)}); move them out or remove the folder first")
    try:
        target.mkdir(exist_ok=True)
        init.write_text(SOURCE, encoding="utf-8")
    except OSError as exc:  # a folder of another user's, or read-only: the same class (PermissionError, ...)
        error = type(exc)(f"cannot write {init}: {exc.strerror or exc}")
        error.errno = exc.errno  # (a filename would change its message: the path is in it)
        raise error from exc
    return init
