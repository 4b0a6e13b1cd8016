"""What a path of object patches names when a ComfyUI ModelPatcher runs (`resolve`), and where a patch on a prefix
of a path makes it reach another module than the one there (`replaced_above`): the node's patches are on the forward
of modules, so such a module hides them (docs/comfyui.md, With other nodes on the same model)."""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

from .models import unwrap


def step(patcher, key: str, parent, live, own_patches: bool):
    """One step of a path as `patcher` runs it: (what `key` names under `parent`, what it names on the shared model
    under `live`, the same step taken there). Its own object patch (if `own_patches`); else, where `parent` is the
    shared model's own object there, what an object patch there replaced (another clone loaded leaves its patches
    on the model until the next load); else the attribute."""
    name = key.rpartition(".")[2]
    on_model = getattr(live, name, None)
    if own_patches and key in patcher.object_patches:
        return patcher.object_patches[key], on_model
    if key in patcher.object_patches_backup and _hands_on(parent, live, name):
        return patcher.object_patches_backup[key], on_model
    return getattr(parent, name), on_model


def _hands_on(parent, live, name: str) -> bool:
    """Whether `parent`'s attribute `name` is `live`'s: the same object once each side's torch.compile wrappers
    without an attribute of that name of their own are looked through (a wrapper hands those on to the module it
    wraps, setting them too; its forward is its own)."""
    def holder(obj):
        while unwrap(obj) is not obj and name not in vars(obj) and not hasattr(type(obj), name):
            obj = obj._orig_mod
        return obj
    return live is not None and holder(parent) is holder(live)


def walk(patcher, path: str, own_patches: bool = True):
    """(what `path` names when `patcher` runs, `step` by `step`; what it names on the shared model now)."""
    value = live = patcher.model
    parts = path.split(".")
    for i in range(1, len(parts) + 1):
        value, live = step(patcher, ".".join(parts[:i]), value, live, own_patches)
    return value, live


def resolve(patcher, path: str, own_patches: bool = True):
    """What `path` names when `patcher` runs, not what the shared model holds now."""
    return walk(patcher, path, own_patches)[0]


def replaced_above(patcher, paths: Iterable[str]) -> Optional[Tuple[str, str]]:
    """(the prefix, the path) of the first of `paths` (module paths) that reaches, with `patcher`'s object patches,
    another module than without them, because one of its prefixes, itself included, is object-patched (a
    torch.compile wrapper of the same module is no other; a patch holding the same module, a list of the same
    blocks, a wrapper calling the model it holds, reaches it): the prefix is the first patched one whose own
    module is another; None where there is none."""
    for path in paths:
        parts = path.split(".")
        patched = [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in
                   patcher.object_patches]
        if not patched:
            continue
        try:
            reached = unwrap(resolve(patcher, path))
        except AttributeError:  # the module put in place has no such attribute
            reached = None
        if reached is unwrap(resolve(patcher, path, own_patches=False)):
            continue
        other = [above for above in patched
                 if unwrap(resolve(patcher, above, own_patches=False)) is not unwrap(resolve(patcher, above))]
        return (other or patched)[0], path
    return None


def replacement(patcher, paths: Iterable[str]) -> Optional[str]:
    """What `replaced_above` finds, as the node's errors name it: the prefix, the object patched there and the path
    it hides; None where there is none."""
    found = replaced_above(patcher, paths)
    if found is None:
        return None
    above, path = found
    kind = type(patcher.object_patches[above])
    holds = "" if above == path else f", which holds the self-attention {path}"
    return f"{above} (an object patch, a {kind.__module__}.{kind.__qualname__}){holds}"
