"""Backward checks only a GPU can run: compiled kernels, torch.compile with Triton, CUDA graphs."""

import pytest
import torch

import vstar_kernels as vk

from ..helpers import assert_grads_close, make_qkv, reference_grads

pytestmark = pytest.mark.gpu


def cuda_qkv(B, H, nq, nk, d, dv, dtype, seed=0):
    """(B, N, H, D) projections viewed as (B, H, N, D), as diffusers hands them over."""
    return make_qkv(B, H, nq, nk, d, dv, dtype, layout="bnhd", seed=seed, device="cuda")


@pytest.mark.parametrize("opts", [dict(strength=-1.0, sigma=4.0), dict(causal=True, max_mode="global")],
                         ids=["negative", "causal-global"])
@pytest.mark.parametrize("d", [64, 80, 256])
@pytest.mark.parametrize("n", [16, 128, 300, 1000])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_compiled_backward_across_shapes(n, d, dtype, opts):
    q, k, v = (t.requires_grad_() for t in cuda_qkv(8, 2, n, n, d, d, dtype))
    out = vk.tar_attention(q, k, v, backend="triton", **opts)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    refs = reference_grads(q, k, v, grad_out, device="cuda", **opts)
    assert_grads_close(grads, refs, dtype)


def test_delta_gradient_on_gpu():
    q, k, v = (t.requires_grad_() for t in cuda_qkv(4, 3, 300, 300, 64, 64, torch.float16))
    delta = torch.rand(300, 300, device="cuda", requires_grad=True)
    out = vk.tar_attention(q, k, v, delta=delta, backend="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, delta), grad_out)
    refs = reference_grads(q, k, v, grad_out, delta=delta, device="cuda")
    assert_grads_close(grads, refs, torch.float16)


class Block(torch.nn.Module):
    def __init__(self, channels=64, heads=4, **tar):
        super().__init__()
        self.heads, self.tar = heads, tar
        self.qkv = torch.nn.Linear(channels, 3 * channels)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return vk.tar_attention(q, k, v, backend="triton", **self.tar)


@pytest.mark.parametrize("n", [16, 300])
def test_torch_compile_with_triton_kernels(n):
    torch.manual_seed(0)
    model = Block(max_mode="global").cuda().half()
    x = torch.randn(32, n, 64, device="cuda", dtype=torch.float16)
    grad_out = torch.randn(32, 4, n, 16, device="cuda", dtype=torch.float16)
    results = []
    for fn in (torch.compile(model, fullgraph=True), model):
        model.zero_grad()
        y = fn(x)
        y.backward(grad_out)
        results.append((y, [p.grad.clone() for p in model.parameters()]))
    (y_c, g_c), (y_e, g_e) = results
    torch.testing.assert_close(y_c, y_e, atol=2e-3, rtol=2e-3)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("n,max_mode", [(16, "row"), (300, "global")])
def test_cuda_graph_capture_replays_forward_and_backward(n, max_mode):
    q, k, v = (t.detach().clone().requires_grad_() for t in cuda_qkv(16, 4, n, n, 64, 64, torch.float16))
    grad_out = torch.randn(16, 4, n, 64, device="cuda", dtype=torch.float16)

    def step():
        for t in (q, k, v):
            t.grad = None
        out = vk.tar_attention(q, k, v, sigma=2.0, max_mode=max_mode, backend="triton")
        out.backward(grad_out)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: autotuning and first launches happen outside the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    new = cuda_qkv(16, 4, n, n, 64, 64, torch.float16, seed=1)
    with torch.no_grad():
        for t, fresh in zip((q, k, v), new):
            t.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    captured = [static_out.clone()] + [t.grad.clone() for t in (q, k, v)]
    eager = [step().detach()] + [t.grad for t in (q, k, v)]
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
