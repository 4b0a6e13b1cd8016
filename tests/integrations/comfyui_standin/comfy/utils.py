"""Dotted attribute paths on a module tree."""


def get_attr(obj, path):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr(obj, path, value):
    """Set the attribute at `path` and return what was there."""
    *parents, last = path.split(".")
    for name in parents:
        obj = getattr(obj, name)
    previous = getattr(obj, last)
    setattr(obj, last, value)
    return previous
