"""The packed forward's batched tiles and the vector width of the forward's tile loads.

* vector_width: the VEC the launcher promises to load_tile must hold for every element a tile
  touches, whatever the strides (checked against the addresses themselves).
* the packed kernel (one batched product per sequence) against the float64 reference at the
  head dims with vector loads of 4 or 8 entries (40, 72, 80, 160) and with none (odd strides,
  offsets, strided head dim), odd sequence counts and lengths, ties and static frames, and its
  backward, which recomputes the same 3-D tiles.
* compiled for sm_90 (no GPU needed): at D = 40 the packed and the tiled forward load and store
  with 128-bit instructions, and the packed one runs its products on tensor cores.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import triton

import vstar_kernels as vk
from vstar_kernels.ops.launch import vector_width

from .._device import DEVICE
from ..helpers import assert_close_to_reference, assert_grads_close, dtype_id, reference64, reference_grads

INTERPRETING = triton.knobs.runtime.interpret


def strided(B, H, n, d, dtype, kind, seed=0):
    """A (B, H, n, d) view: "bhnd", "bnhd" (diffusers), "offset4"/"offset1" (the head dim starts 4
    or 1 element into a wider row), "every2" (every second entry of the head dim)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype)  # noqa: E731
    if kind == "bnhd":
        return rand(B, n, H, d).transpose(1, 2)
    if kind.startswith("offset"):
        at = int(kind[len("offset"):])
        return rand(B, H, n, d + 8)[..., at:at + d]
    if kind == "every2":
        return rand(B, H, n, 2 * d)[..., ::2]
    return rand(B, H, n, d)


def vector_claim_holds(t: torch.Tensor, vec: int) -> bool:
    """Every run of vec head-dim entries starts at an address divisible by vec elements, is
    contiguous, and the head dim is whole runs: what load_tile's hints promise."""
    if vec == 1:
        return True
    size = t.element_size()
    idx = [torch.arange(n) for n in t.shape[:-1]]
    grids = torch.meshgrid(*idx, indexing="ij")
    rows = sum(g * s for g, s in zip(grids, t.stride()[:-1]))
    starts = t.data_ptr() + size * rows  # the address of each row's first head-dim entry
    return t.stride(-1) == 1 and t.shape[-1] % vec == 0 and bool((starts % (vec * size) == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("d", [40, 64, 72, 80, 160, 41, 8])
@pytest.mark.parametrize("kind", ["bhnd", "bnhd", "offset4", "offset1", "every2"])
def test_vector_width_is_a_true_claim(kind, d, dtype):
    t = strided(2, 3, 5, d, dtype, kind)
    vec = vector_width(t)
    assert vector_claim_holds(t, vec)
    widest = 16 // t.element_size()
    if kind in ("offset1", "every2") or d % 2:
        assert vec == 1
    elif kind == "offset4":
        assert vec == min(4, widest)
    else:  # aligned rows: the largest power of two dividing D, up to 16 bytes
        assert vec == min(widest, d & -d)


def test_vector_width_is_the_narrowest_tensors():
    a, b = strided(1, 2, 4, 40, torch.float16, "bnhd"), strided(1, 2, 4, 40, torch.float16, "offset4")
    assert vector_width(a) == 8 and vector_width(a, b) == 4
    assert vector_width(a, b[..., :1].expand(1, 2, 4, 8)) == 1  # a broadcast head dim (stride 0)


needs_kernels = pytest.mark.skipif(not (INTERPRETING or torch.cuda.is_available()),
                                   reason="the Triton kernels run in the interpreter or on a GPU")


def qkv(B, H, nq, nk, d, dv, dtype, kind="bhnd", seed=0):
    return (strided(B, H, nq, d, dtype, kind, seed), strided(B, H, nk, d, dtype, kind, seed + 1),
            strided(B, H, nk, dv, dtype, kind, seed + 2))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("shape,kind", [
    ((3, 3, 16, 16, 40, 40), "bnhd"),     # 9 sequences: the last program is partly empty
    ((1, 3, 13, 13, 72, 72), "offset4"),  # 13 rows: padded to 16 per sequence
    ((2, 1, 33, 21, 80, 80), "bnhd"),     # Nq != Nk
    ((1, 2, 24, 24, 160, 160), "offset1"),  # wide head: no vector loads
    ((2, 2, 5, 9, 40, 24), "every2"),     # strided head dim
    ((1, 2, 100, 90, 64, 64), "bnhd"),    # one sequence per program: 2-D products
])
@pytest.mark.parametrize("opts", [dict(), dict(causal=True, max_mode="global", sigma=3.0)],
                         ids=["row", "causal-global"])
def test_packed_forward_odd_shapes_and_strides(shape, kind, dtype, opts):
    q, k, v = qkv(*shape, dtype, kind)
    out = vk.tar_attention(q, k, v, backend="triton", **opts)
    assert_close_to_reference(out.cpu(), reference64(q, k, v, **opts), dtype)


def static_frames(B, H, n, d, dtype, seed=0):
    """q, k, v of a video whose frames repeat in pairs, and one (batch 1) of a static video:
    many keys tie exactly for the row max."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, d, generator=g) for _ in range(3))
    k = k[:, :, torch.arange(n) // 2]
    k[1] = k[1, :, :1]
    v[1] = v[1, :, :1]
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v))


@needs_kernels
@pytest.mark.parametrize("n", [12, 100])  # 100: one sequence per program (2-D products)
@pytest.mark.parametrize("max_mode", ["row", "global"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=dtype_id)
def test_packed_ties_and_static_frames_forward_and_backward(dtype, max_mode, n):
    q, k, v = static_frames(2, 2, n, 40, dtype)
    opts = dict(sigma=2.0, strength=2.0, max_mode=max_mode)
    out = vk.tar_attention(q, k, v, backend="triton", **opts)
    assert_close_to_reference(out.cpu(), reference64(q, k, v, **opts), dtype)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    vk.tar_attention(*leaves, backend="triton", **opts).backward(grad_out)
    assert_grads_close([t.grad.cpu() for t in leaves], reference_grads(q, k, v, grad_out, **opts), dtype)


def _exact_ties_tar(q, k, v, strength):
    """The definition (Gaussian sigma 1, row max) in float64 with each score summed entry by entry, so that copies
    of a key score exactly alike and torch.amax splits the max's gradient over all of them."""
    s = (q[..., :, None, :] * k[..., None, :, :]).sum(-1) * q.shape[-1] ** -0.5
    i = torch.arange(s.shape[-2], dtype=s.dtype)
    gauss = torch.exp(-0.5 * (i[None, :] - i[:, None]) ** 2)
    return torch.softmax(s + strength * s.amax(-1, keepdim=True) * gauss, -1) @ v


@needs_kernels
def test_copied_keys_split_the_max_gradient_in_a_packed_tile():
    """Every other key a copy of key 0, several sequences per program (3-D products): the copies tie and share the
    max's gradient, as an exact-tie evaluation says (in the interpreter the batched product was numpy's, which
    rounds copies of a key apart: dk was off by up to 1.6e-2 of its largest value)."""
    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(2, 2, 33, 8, generator=g) for _ in range(4))
    k[:, :, 1::2] = k[:, :, :1]
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(_exact_ties_tar(*leaves, 3.0), leaves, grad_out.double())
    leaves = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    out = vk.tar_attention(*leaves, strength=3.0, backend="triton")
    got = torch.autograd.grad(out, leaves, grad_out.to(DEVICE))
    assert_grads_close([t.cpu() for t in got], want, torch.float32)


@needs_kernels
def test_nonfinite_v_stays_in_its_sequence_of_a_packed_tile():
    """9 sequences of 16 in one program: a NaN in one sequence's v reaches only that sequence."""
    q, k, v = qkv(9, 1, 16, 16, 40, 40, torch.float16)
    v[4, 0, 3, 7] = math.nan
    v[6, 0, 0, 1] = math.inf
    bad = ~torch.isfinite(vk.tar_attention(q, k, v, backend="triton"))
    assert bad[4, 0, :, 7].all() and bad[6, 0, :, 1].all()
    bad[4, 0, :, 7] = False
    bad[6, 0, :, 1] = False
    assert not bad.any()


_SCRIPT = r'''
import json
import torch
import triton
from triton.backends.compiler import GPUTarget
from tools.perf import compile_check as cc
from tools.perf import static

out = {}
for name, shape in (("packed", (8, 8, 16, 16, 40, 40)), ("tiled", (1, 8, 300, 300, 40, 40))):
    case_name, thunk = next(cc.cases([(torch.float16, shape, {})], backward=False))
    launch = cc.record(thunk)[-1]
    config = cc.pruned_configs(launch.kernel, launch.args, launch.kwargs)[0]
    src, options = cc.specialize(launch.kernel.fn, launch.args, {**launch.kwargs, **config.all_kwargs()}, 90)
    cubin = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]
    ops, _ = static.parse_sass(static.disassemble(cubin))
    out[name] = sorted({op for op in ops if op.startswith(("LDG", "STG", "HMMA", "HGMMA"))})
print(json.dumps(out))
'''
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason=f"triton ships no ptxas here ({PTXAS})")
def test_head_dim_40_loads_are_128_bit(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1",
               # this checkout: its package and tools/
               PYTHONPATH=os.pathsep.join(filter(None, [str(pathlib.Path(__file__).resolve().parents[2]),
                                                         env.get("PYTHONPATH")])))
    script = tmp_path / "vector_check.py"  # a file: triton reads a jit function's source
    script.write_text(_SCRIPT)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for name, ops in out.items():
        memory = [op for op in ops if op.startswith(("LDG", "STG"))]
        assert "LDG.E.128" in memory and "STG.E.128" in memory, (name, ops)
        assert not any(op.endswith(("U16", ".16")) for op in memory), (name, ops)
    assert any(op.startswith("HMMA") for op in out["packed"])
