"""backend="cuda": the optional CUDA C++ operator of bindings/.

On CPU: the extension is probed lazily, never breaks `import vstar_kernels`, and an
explicit backend="cuda" that cannot run says why. On a GPU (marker `gpu`, after
`VSTAR_BUILD_CUDA=1 pip install -e . --no-build-isolation`): the operator against the
float64 reference over the forward grid.
"""

import math
import sys

import pytest
import torch

import vstar_kernels as vk
from vstar_kernels import dispatch
from vstar_kernels.ops import _load, tar_cuda
from vstar_kernels._problem import make_problem

from ..helpers import CUDA, CUDA_DTYPES, DELTA_KINDS, assert_close_to_reference, dtype_id, make_delta, make_qkv, \
    reference64


def problem(q, **kw):
    opts = dict(sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None)
    opts.update(kw)
    return make_problem(q, q, q, **opts)


@pytest.fixture
def fresh_cuda_probe():
    tar_cuda.load.cache_clear()
    yield
    tar_cuda.load.cache_clear()


def test_not_built_is_reported_not_raised(monkeypatch, fresh_cuda_probe):
    monkeypatch.setattr(tar_cuda, "extension_path", lambda: None)
    with pytest.raises(vk.BackendUnavailableError,
                       match=r"backend='cuda' cannot run this call: the CUDA C\+\+ extension is not built "
                             r"\(VSTAR_BUILD_CUDA=1 pip install -e \. --no-build-isolation"):
        vk.tar_attention(*(torch.randn(1, 1, 8, 8) for _ in range(3)), backend="cuda")
    assert dispatch.availability("cpu")["cuda"].startswith(tar_cuda.NOT_BUILT)
    assert dispatch.select(problem(torch.randn(1, 1, 8, 8)), "auto").name == "cpu"


def test_broken_library_is_reported_not_raised(monkeypatch, tmp_path, fresh_cuda_probe):
    broken = tmp_path / "_C.so"
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(tar_cuda, "extension_path", lambda: str(broken))
    probe = tar_cuda.load()
    assert not probe.ok
    assert probe.reason.startswith("the CUDA C++ extension failed to load (OSError")
    assert str(broken) in probe.reason
    with pytest.raises(vk.BackendUnavailableError, match="failed to load"):
        vk.tar_attention(*(torch.randn(1, 1, 8, 8) for _ in range(3)), backend="cuda")


def test_declared_limits_come_with_reasons(monkeypatch):
    monkeypatch.setattr(tar_cuda, "load", lambda: _load.Probe(sys, ""))  # as if built and loaded
    backend = dispatch.BACKENDS["cuda"]
    assert backend.not_supported_reasons(problem(torch.randn(1, 1, 8, 8))) == [
        "the CUDA C++ kernel runs on CUDA tensors, got cpu tensors"]
    reasons = "; ".join(backend.not_supported_reasons(problem(torch.randn(1, 1, 1100, 300, dtype=torch.float64))))
    assert "float64 is not a kernel dtype" in reasons
    assert "head dim 300 > 256" in reasons
    assert "Nk 1100 > 1024" in reasons and "backend='triton'" in reasons
    x = torch.randn(1, 1, 4, 4)
    assert "delta is torch.float64" in "; ".join(backend.not_supported_reasons(
        problem(x, delta=torch.rand(4, 4, dtype=torch.float64))))
    assert "no backward" in "; ".join(backend.not_supported_reasons(problem(x.requires_grad_())))


def test_info_says_whether_the_extension_is_built(capsys, fresh_cuda_probe):
    from vstar_kernels.cli import main

    assert main(["info"]) == 0
    stdout = capsys.readouterr().out
    line = next(ln for ln in stdout.splitlines() if ln.startswith("cuda ext"))
    if tar_cuda.extension_path() is None:
        assert line == f"cuda ext      unavailable: {tar_cuda.NOT_BUILT}"
    else:
        assert line.startswith(("cuda ext      built: ", "cuda ext      unavailable: the CUDA C++ extension failed"))
    assert "backend cuda        on cpu    : unavailable:" in stdout


# --------------------------------------------------------------------------- GPU


def cuda_op():
    """The loaded operator module; skips when the extension was not built, fails when it is broken."""
    probe = tar_cuda.load()
    if not probe.ok and probe.reason == tar_cuda.NOT_BUILT:
        pytest.skip(probe.reason)
    assert probe.ok, probe.reason
    return probe.module


def run_cuda(q, k, v, **opts):
    """backend="cuda" on q, k, v after poisoning the allocator's free blocks of the output's size with NaN."""
    cuda_op()
    shape = (*q.shape[:-1], v.shape[-1])
    torch.full(shape, math.nan, dtype=q.dtype, device=q.device)  # freed at once: the output likely reuses it
    return vk.tar_attention(q, k, v, backend="cuda", **opts)


def check_gpu(q, k, v, **opts):
    out = run_cuda(q, k, v, **opts)
    assert_close_to_reference(out.cpu(), reference64(q, k, v, **opts), q.dtype)


def qkv(*shape, **kwargs):
    return make_qkv(*shape, device="cuda", **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [40, 64, 80, 128, CUDA.SUPPORTED_MAX_HEAD_DIM])
@pytest.mark.parametrize("n", [1, 7, 16, 33, 128, 256])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(max_mode="global"),
                                  dict(causal=True, max_mode="global", sigma=3.0, strength=-0.5, scale=0.1)],
                         ids=["row", "causal", "global", "causal-global-options"])
def test_gpu_forward_grid(n, d, dtype, opts):
    check_gpu(*qkv(8, 3, n, n, d, d, dtype), **opts)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 2, 20, 50, 32, 24), (4, 2, 70, 20, 32, 32), (2, 2, 300, 1024, 64, 40),
                                   (3, 1, 1, 1, 8, 8)])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
def test_gpu_rectangular_and_extreme_shapes(shape, dtype):
    check_gpu(*qkv(*shape, dtype), causal=True)
    check_gpu(*qkv(*shape, dtype, seed=1), max_mode="global")


@pytest.mark.gpu
@pytest.mark.parametrize("delta_dtype", ["fp32", "input"])
@pytest.mark.parametrize("delta_shape", DELTA_KINDS)
@pytest.mark.parametrize("n", [16, 200])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
def test_gpu_custom_delta(n, delta_shape, delta_dtype, dtype):
    B, H = 3, 2
    delta = make_delta(delta_shape, B, H, n, n, dtype=torch.float32 if delta_dtype == "fp32" else dtype, device="cuda")
    q, k, v = qkv(B, H, n, n, 64, 64, dtype)
    for opts in (dict(), dict(causal=True, max_mode="global")):
        check_gpu(q, k, v, delta=delta, **opts)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bnhd", "sliced"])
@pytest.mark.parametrize("n", [16, 150])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_gpu_strided_views(n, layout, dtype):
    q, k, v = qkv(4, 3, n, n, 40, 40, dtype, layout=layout)
    assert not q.is_contiguous()
    check_gpu(q, k, v, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_gpu_batch_times_heads_above_65535(dtype):
    # 2 x 40 x 64 positions x 20 heads = 102,400 sequences of 16 frames.
    B, H, N, D = 2 * 40 * 64, 20, 16, 64
    q, k, v = qkv(B, H, N, N, D, D, dtype, layout="bnhd")
    out = run_cuda(q, k, v)
    assert not torch.isnan(out).any()
    idx = torch.tensor([0, 1, B // 2, B - 1], device="cuda")
    ref = vk.tar_attention_reference(q[idx].double(), k[idx].double(), v[idx].double())
    assert_close_to_reference(out[idx].cpu(), ref.cpu(), dtype)


@pytest.mark.gpu
def test_gpu_plain_attention_equals_sdpa():
    q, k, v = qkv(4, 2, 64, 64, 32, 32, torch.float32)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for opts in (dict(strength=0.0), dict(sigma=math.inf)):
        torch.testing.assert_close(run_cuda(q, k, v, causal=True, **opts), sdpa, atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
def test_gpu_operator_registration_passes_opcheck():
    cuda_op()
    q, k, v = qkv(2, 2, 16, 16, 32, 32, torch.float16)
    delta = torch.rand(16, 16, device="cuda").expand(2, 2, 16, 16)
    for args in ((q, k, v, 1.0, 1.0, None, False, False, 0.125), (q, k, v, math.inf, 2.0, delta, True, True, 0.125)):
        torch.library.opcheck(torch.ops.vstar.tar_attention_fwd.default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("sigma, strength, scale, message", [
    (0.0, 1.0, 0.125, "sigma must be > 0"), (1.0, 1e39, 0.125, "strength must be finite"),
    (1.0, -math.inf, 0.125, "strength must be finite"), (1.0, 1.0, 0.0, "scale must be > 0"),
    (1.0, 1.0, 1e39, "scale must be > 0 and <= "), (1.0, 1.0, math.nan, "scale must be > 0")])
def test_gpu_operator_refuses_what_the_python_op_refuses(sigma, strength, scale, message):
    """The registered operator called directly: a strength or scale past float32 was inf in the kernel (a NaN
    output), a scale <= 0 was taken."""
    cuda_op()
    q, k, v = qkv(1, 1, 16, 16, 32, 32, torch.float16)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.vstar.tar_attention_fwd(q, k, v, sigma, strength, None, False, False, scale)


@pytest.mark.gpu
def test_gpu_auto_falls_back_to_cuda_without_triton(monkeypatch):
    cuda_op()
    monkeypatch.setattr(_load, "triton_ops", lambda: _load.Probe(None, "triton is not importable (test)"))
    q = torch.randn(1, 1, 16, 16, device="cuda", dtype=torch.float16)
    assert dispatch.select(problem(q), "auto").name == "cuda"
