"""docs/api.md's signature block names every public name of vstar_kernels, and each function's and class's
signature there is the code's (names, order, defaults)."""

import inspect
import re
from pathlib import Path

import vstar_kernels as vk

API = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def signature_block() -> dict:
    """name -> the text in parentheses after it (None: named without a call) in the first plain ``` block."""
    block, fence = [], None
    for line in API.read_text().splitlines():
        if line.startswith("```"):
            if fence == "":  # the end of the first plain block
                break
            fence = line[3:] if fence is None else None
        elif fence == "":
            block.append(line)
    entries, name = {}, None
    for line in block:
        found = re.match(r"([A-Za-z_]\w*)(\((.*))?", line)
        if found:  # a new entry; its parentheses may run on to the next lines
            name, text = found.group(1), found.group(3)
            entries[name] = text
        elif name is not None and entries[name] is not None:
            entries[name] += " " + line.strip()
    return {name: None if text is None else _inside(text) for name, text in entries.items()}


def _inside(text: str) -> str:
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        if ch == ")":
            if depth == 0:
                return text[:i]
            depth -= 1
    raise AssertionError(f"unbalanced parentheses in docs/api.md: {text}")


def documented(params: str) -> list:
    """(name, default text or None, keyword-only) of each parameter in a signature's text."""
    out, keyword_only = [], False
    for part in (p.strip() for p in params.split(",")):
        if part == "*":
            keyword_only = True
        elif part:
            name, _, default = part.partition("=")
            out.append((name.strip(), default.strip() or None, keyword_only))
    return out


def actual(obj) -> list:
    target = obj.__init__ if inspect.isclass(obj) and "__init__" in vars(obj) else obj
    params = [p for p in inspect.signature(target).parameters.values() if p.name != "self"]
    if inspect.isclass(obj) and hasattr(obj, "__dataclass_fields__"):
        params = [p for p in params if obj.__dataclass_fields__[p.name].init]
    return [(p.name, None if p.default is p.empty else p.default, p.kind == p.KEYWORD_ONLY) for p in params]


def test_every_public_name_is_in_the_signature_block():
    missing = sorted(set(vk.__all__) - {"__version__"} - set(signature_block()))
    assert not missing, f"docs/api.md's signature block lacks {missing}"


def test_documented_signatures_are_the_code_s():
    for name, params in signature_block().items():
        obj = getattr(vk, name)
        if params is None or not callable(obj):
            continue
        doc, code = documented(params), actual(obj)
        assert [(n, k) for n, _, k in doc] == [(n, k) for n, _, k in code], name
        for (param, text, _), (_, default, _) in zip(doc, code):
            if text is not None:
                assert eval(text, {"torch": __import__("torch")}) == default, f"{name}({param}={text})"
            else:
                assert default is None or param in ("q", "k", "v"), f"{name}: {param} has a default in the code"
