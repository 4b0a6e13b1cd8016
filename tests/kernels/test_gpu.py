"""Checks only a GPU can run: skipped without CUDA (marker `gpu`)."""

import pytest
import torch

import vstar_kernels as vk

from ..helpers import assert_close_to_reference, assert_grads_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batch_times_heads_above_65535(dtype):
    # 2 x 40 x 64 positions x 20 heads = 102,400 sequences of 16 frames: past the 65,535 grid-axis limit.
    B, H, N, D = 2 * 40 * 64, 20, 16, 64
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(3))
    out = vk.tar_attention(q, k, v, backend="triton")
    torch.cuda.synchronize()
    idx = torch.tensor([0, 1, B // 2, B - 1], device="cuda")
    ref = vk.tar_attention_reference(q[idx].double(), k[idx].double(), v[idx].double())
    assert_close_to_reference(out[idx].cpu(), ref.cpu(), dtype)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("n", [1024, 4096])
@pytest.mark.parametrize("max_mode", ["row", "global"])
def test_long_videos(n, max_mode):
    q, k, v = (torch.randn(2, 4, n, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    out = vk.tar_attention(q, k, v, sigma=8.0, max_mode=max_mode, backend="triton")
    ref = vk.tar_attention_reference(q.double(), k.double(), v.double(), sigma=8.0, max_mode=max_mode)
    assert_close_to_reference(out.cpu(), ref.cpu())


@pytest.mark.parametrize("d", [40, 64, 80, 128, 160, 256])
@pytest.mark.parametrize("n", [16, 64, 200])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_compiled_kernels_across_head_dims(d, n, dtype):
    q, k, v = (torch.randn(64, n, 4, d, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(3))
    for opts in (dict(), dict(causal=True, max_mode="global")):
        out = vk.tar_attention(q, k, v, backend="triton", **opts)
        ref = vk.tar_attention_reference(q.double(), k.double(), v.double(), **opts)
        assert_close_to_reference(out.cpu(), ref.cpu(), dtype)


def test_auto_picks_triton_on_cuda():
    from vstar_kernels import dispatch
    from vstar_kernels._problem import make_problem

    q = torch.randn(1, 1, 16, 16, device="cuda", dtype=torch.float16)
    p = make_problem(q, q, q, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None)
    assert dispatch.select(p, "auto").name == "triton"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("speculate", [False, True])
def test_a_call_on_a_gpu_that_is_not_the_current_one(speculate):
    """A model split over GPUs calls with tensors on a device that is not the current one: the kernels launch
    there (Triton launches on the current device), forward and backward."""
    ids = vk.frame_ids(4, 40, text_after=7)
    q, k, v = (torch.randn(2, 3, ids.numel(), 64, device="cuda:1", dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    assert torch.cuda.current_device() == 0
    out = vk.tar_attention(q, k, v, frames=ids.to("cuda:1"), sigma=1.5, backend="triton", speculate=speculate)
    out.float().square().sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out = vk.tar_attention_reference(*ref, frames=ids.to("cuda:1"), sigma=1.5)
    ref_out.square().sum().backward()
    assert out.device == torch.device("cuda:1")
    assert_close_to_reference(out.detach().cpu(), ref_out.detach().cpu(), torch.float16)
    assert_grads_close([t.grad.cpu() for t in (q, k, v)], [r.grad.cpu() for r in ref], torch.float16)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_a_compiled_call_with_a_frame_layout_is_captured_in_cuda_graphs(backend):
    """torch.compile(mode="reduce-overhead") captures a call whose frames are a FrameLayout (no host read of its
    ids; an id tensor's read on every compiled call would stop the capture), forward and backward: the replays
    give the eager call's output bit for bit and its gradients."""
    from torch._dynamo.utils import counters

    layout = vk.FrameLayout(4, 40, text_after=7)
    q, k, v = (torch.randn(1, 2, layout.tokens(), 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad_out = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)

    def call(q, k, v):
        return vk.tar_attention(q, k, v, sigma=1.5, frames=layout, backend=backend)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(call, mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        out = compiled(q, k, v)
        grads = [g.clone() for g in torch.autograd.grad(out, (q, k, v), grad_out)]
        out = out.clone()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    expected = call(q, k, v)
    assert torch.equal(out, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, (q, k, v), grad_out)):
        torch.testing.assert_close(got, want)
