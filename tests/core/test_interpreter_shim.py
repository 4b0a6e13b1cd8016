"""tests/_interpreter.py, the interpreter step the suite skips: nothing was left to patch where it skipped,
the same bits without it, and it applies."""

import inspect
import math
import os
import subprocess
import sys

import pytest
import torch
import triton.language as tl

import vstar_kernels as vk

from .. import _interpreter
from .._device import DEVICE
from ..helpers import interpreter_env, make_qkv

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the shim serves the Triton interpreter")


def _nothing_to_patch(fn):
    """What the interpreter's patch for fn would replace: the builtins still unpatched in the modules fn's module
    sees, their tensor class, tl.math (with tl) and the tensor descriptor class. Where the shim skips, none."""
    seen = [m for m in (tl, tl.core) if id(m) in _interpreter.langs(fn)]
    scanned = [*seen, *(m.tensor for m in seen), *([tl.math] if tl in seen else []), tl.core.tensor_descriptor_base]
    left = [f"{getattr(obj, '__name__', obj)}.{name}" for obj in scanned
            for name, member in inspect.getmembers(obj) if tl.core.is_builtin(member)]
    assert not left, f"{fn.__qualname__}: skipped, but {left[:5]} unpatched"


def _run():
    """Forward and backward through our kernels (tiled: frame ids and a key mask; packed: causal, global max,
    sigma = inf), whose helpers call Triton's own (tl.max, tl.sum: their module sees tl.core, ours tl): the
    outputs and gradients, and how many helper patches the shim skipped. One head: the shim acts at each grid's
    start and each helper call, alike in every program."""
    skipped = _interpreter.skipped
    results = []
    gen = torch.Generator().manual_seed(3)
    frames = vk.frame_ids(4, 32, text_before=7, device=DEVICE)  # 135 tokens: the tiled layout
    key_mask = torch.rand(1, frames.numel(), generator=gen) > 0.2
    for n, opts in ((frames.numel(), dict(frames=frames, sigma=0.7, key_mask=key_mask)),
                    (40, dict(causal=True, max_mode="global", sigma=math.inf))):
        q, k, v = (t.requires_grad_() for t in make_qkv(1, 1, n, n, 32, 32, torch.float32, seed=5))
        out = vk.tar_attention(q, k, v, backend="triton", **opts)
        grad_out = torch.randn(out.shape, generator=gen)
        results += [out, *torch.autograd.grad(out, (q, k, v), grad_out)]
    return results, _interpreter.skipped - skipped


def test_kernels_give_the_same_bits_without_the_shim(monkeypatch):
    assert _interpreter.interpreter._patch_lang is _interpreter._patch_lang_once, "tests/_device.py installs it"
    monkeypatch.setattr(_interpreter, "on_skip", _nothing_to_patch)
    shimmed, skipped = _run()
    _interpreter.uninstall()
    try:
        stock, none_skipped = _run()
    finally:
        _interpreter.install()
    assert none_skipped == 0 and skipped > 100  # it applies to the Triton installed (thousands a call)
    for a, b in zip(stock, shimmed, strict=True):
        assert a.dtype == torch.float32 and torch.equal(b.view(torch.int32), a.view(torch.int32))
    assert not _interpreter._grids  # every grid popped


def test_a_process_started_with_interpreter_env_has_the_shim(tmp_path):
    """tests/_site: the shim where TRITON_INTERPRET=1 is set from the start, the interpreter as shipped where it is
    not, and a sitecustomize further on the path still runs."""
    (tmp_path / "sitecustomize.py").write_text("import builtins\nbuiltins.next_site_ran = True\n")
    code = ("import builtins\nfrom triton.runtime import interpreter\n"
            "print(interpreter._patch_lang.__name__, getattr(builtins, 'next_site_ran', False))")
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(tmp_path)]))
    for interpret, wanted in (("1", "_patch_lang_once True"), ("0", "_patch_lang True")):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env=interpreter_env({**base, "TRITON_INTERPRET": interpret}))
        assert done.returncode == 0, done.stderr
        assert done.stdout.split("\n")[0] == wanted, (interpret, done.stdout, done.stderr)
