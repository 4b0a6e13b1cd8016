"""Gradients of the reference, the vstar::tar_attention op (opcheck, autograd) and torch.compile."""

import functools
import math

import pytest
import torch
from torch.library import opcheck

import vstar_kernels as vk
import vstar_kernels._op  # noqa: F401  (registers torch.ops.vstar.*, which the tests below call by name)

from .._device import DEVICE
from ..helpers import opts_id, reference_grads

pytestmark = pytest.mark.long  # scheduled first (tests/conftest.py)

GRADCHECK_OPTIONS = [
    dict(),
    dict(causal=True, sigma=2.5, strength=0.7),
    dict(max_mode="global"),
    dict(max_mode="global", causal=True, strength=-1.3, scale=0.31),
    dict(sigma=math.inf),
]


def float64_inputs(B, H, nq, nk, d, dv, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
                 for shape in ((B, H, nq, d), (B, H, nk, d), (B, H, nk, dv)))


@pytest.mark.parametrize("opts", GRADCHECK_OPTIONS, ids=opts_id)
def test_reference_gradcheck(opts):
    q, k, v = float64_inputs(2, 1, 5, 6, 4, 3, seed=1)
    assert torch.autograd.gradcheck(lambda a, b, c: vk.tar_attention_reference(a, b, c, **opts), (q, k, v))


@pytest.mark.parametrize("max_mode", ["row", "global"])
def test_reference_gradcheck_in_delta(max_mode):
    q, k, v = float64_inputs(2, 2, 4, 5, 3, 3, seed=2)
    delta = torch.rand(2, 1, 4, 5, dtype=torch.float64, requires_grad=True)  # broadcast over heads
    assert torch.autograd.gradcheck(
        lambda a, b, c, dl: vk.tar_attention_reference(a, b, c, delta=dl, max_mode=max_mode), (q, k, v, delta))


@pytest.mark.parametrize("opts", [dict(), dict(max_mode="global", causal=True)], ids=opts_id)
def test_op_gradcheck_on_reference_backend(opts):
    """The op's registered backward (torch.func.vjp of the reference) against finite differences."""
    q, k, v = float64_inputs(1, 2, 5, 5, 4, 3, seed=3)
    delta = torch.rand(5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c, dl: vk.tar_attention(a, b, c, delta=dl, backend="reference", **opts), (q, k, v, delta))


def test_ties_get_even_shares_on_reference_backend():
    """A row of equal scores: torch.amax's gradient splits evenly, and the op's backward agrees."""
    q = torch.zeros(1, 1, 4, 8, dtype=torch.float64, requires_grad=True)  # every score is 0: all keys tie
    k, v = (torch.randn(1, 1, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    refs = torch.autograd.grad(vk.tar_attention_reference(q, k, v), (q, k, v), grad_out)
    grads = torch.autograd.grad(vk.tar_attention(q, k, v, backend="reference"), (q, k, v), grad_out)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)


def op_args(B, H, nq, nk, d, dv, *, delta, backend, needs_grad=True, dtype=torch.float32, max_mode="row"):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype).requires_grad_(needs_grad)
               for shape in ((B, H, nq, d), (B, H, nk, d), (B, H, nk, dv)))
    if delta:
        delta = torch.rand(nq, nk, generator=g).to(DEVICE).expand(B, H, nq, nk).detach().requires_grad_(needs_grad)
    else:
        delta = None
    return (q, k, v, 1.5, 1.0, delta, False, max_mode, d ** -0.5, None, None, None, backend, needs_grad)


OPCHECK_CASES = [
    dict(shape=(2, 2, 6, 7, 8, 5), delta=False, backend="reference"),
    dict(shape=(2, 2, 6, 7, 8, 5), delta=True, backend="reference", max_mode="global"),
    dict(shape=(2, 2, 6, 7, 8, 5), delta=False, backend="reference", needs_grad=False),
    dict(shape=(2, 2, 12, 12, 16, 16), delta=True, backend="triton"),
    dict(shape=(1, 1, 130, 132, 16, 16), delta=False, backend="triton", max_mode="global"),
]


@pytest.mark.parametrize("case", OPCHECK_CASES,
                         ids=lambda c: "-".join(str(c[key]) for key in ("backend", "delta", "max_mode", "needs_grad")
                                                if key in c) + "-N{}".format(c["shape"][2]))
def test_opcheck(case):
    args = op_args(*case["shape"], delta=case["delta"], backend=case["backend"],
                   needs_grad=case.get("needs_grad", True), max_mode=case.get("max_mode", "row"))
    opcheck(torch.ops.vstar.tar_attention.default, args)
    if case["backend"] == "triton":  # the reference's backward is traced PyTorch, not this op
        out, stats, _ = torch.ops.vstar.tar_attention(*args)
        q, k, v, sigma, strength, delta = (t.detach() if isinstance(t, torch.Tensor) else t for t in args[:6])
        back_args = (torch.randn_like(out), out.detach(), stats, q, k, v, sigma, strength, delta, *args[6:13],
                     delta is not None)
        opcheck(torch.ops.vstar.tar_attention_backward.default, back_args)


def test_torch_export_round_trip(tmp_path):
    """docs/compile-and-autograd.md: a model calling tar_attention (frame ids, dynamic length) exports, saves and
    loads, and the loaded program gives the eager output at another length."""

    class Model(torch.nn.Module):
        def forward(self, q, frames):
            return vk.tar_attention(q, q, q, frames=frames, sigma=2.0)

    n = torch.export.Dim("n", min=4, max=4096)
    q, frames = torch.randn(1, 2, 24, 16, device=DEVICE), torch.arange(24, device=DEVICE) // 6
    program = torch.export.export(Model(), (q, frames), dynamic_shapes=({2: n}, {0: n}))
    torch.export.save(program, tmp_path / "tar.pt2")
    loaded = torch.export.load(tmp_path / "tar.pt2").module()
    q, frames = torch.randn(1, 2, 40, 16, device=DEVICE), torch.arange(40, device=DEVICE) // 8
    assert torch.equal(loaded(q, frames), Model()(q, frames))


def test_a_backend_baked_in_for_another_device_raises():
    """The backend "auto" chose is an argument of the op, fixed in a traced program (torch.export): run on another
    device's tensors the op refuses that backend rather than run it there (the CPU backend on CUDA tensors ran, slowly,
    without a word)."""
    other = "cpu" if DEVICE == "cuda" else "cuda"
    args = op_args(1, 1, 8, 8, 16, 16, delta=False, backend=other, needs_grad=False)
    with pytest.raises(vk.BackendUnavailableError, match=f"backend='{other}' cannot run.*runs on {other} tensors.*"
                                                         "traced"):
        torch.ops.vstar.tar_attention(*args)


def test_inference_call_saves_nothing():
    args = op_args(1, 1, 130, 130, 16, 16, delta=False, backend="triton", needs_grad=False)
    _, stats, _ = torch.ops.vstar.tar_attention(*args)
    assert stats.numel() == 0
    _, stats, _ = torch.ops.vstar.tar_attention(*args[:-1], True)
    assert stats.shape == (1, 130, vk.ops.layout.STATS_FIELDS)


def test_second_order_gradients_on_reference_backend():
    """The reference's backward is traced PyTorch (torch.func.vjp), so it is differentiable too."""
    q, k, v = float64_inputs(1, 1, 4, 4, 3, 3, seed=5)
    assert torch.autograd.gradgradcheck(lambda a, b, c: vk.tar_attention(a, b, c, backend="reference"), (q, k, v))


def test_double_backward_through_kernels_is_refused_clearly():
    q, k, v = (torch.randn(1, 1, 8, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    (dq,) = torch.autograd.grad(vk.tar_attention(q, k, v, backend="triton").sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="tar_attention: the 'triton' backend's gradients are first order: .* "
                                           "needs backend='reference' or 'cpu'"):
        dq.sum().backward()


@pytest.mark.parametrize("backend, n, opts", [("reference", 40, {}), ("cpu", 40, {}), ("triton", 40, {}),
                                             ("cpu", 2048, dict(max_mode="global")),
                                             ("tar_attention_reference", 40, {})],
                         ids=["reference", "cpu", "triton", "cpu-global-row-blocks", "tar_attention_reference"])
def test_autocast_leaves_the_math_in_float32(backend, n, opts):
    """The math runs in float32 whatever the input dtype (docs/semantics.md), under the caller's autocast too: the
    reference's products, and the CPU backend's slice max for the global max (more than one row block at N = 2048),
    ran in bfloat16 under CPU autocast (8e-3 and 0.1 from float64). A float32 call under autocast is the call
    without it, output and gradients, bit for bit."""
    call = vk.tar_attention_reference if backend == "tar_attention_reference" else \
        functools.partial(vk.tar_attention, backend=backend)
    g = torch.Generator().manual_seed(6)
    inputs = [(3 * torch.randn(1, 2, n, 16, generator=g)).to(DEVICE) for _ in range(3)]
    results = []
    for autocast in (False, True):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=autocast):
            out = call(q, k, v, sigma=4.0, frames=torch.arange(n, device=DEVICE) // 8, **opts)
            assert out.dtype == torch.float32
            if backend != "tar_attention_reference":  # the op's backward under autocast too
                results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
        if backend == "tar_attention_reference":  # a plain function's backward is autograd's: not under autocast
            results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))  # (PyTorch's advice)
    for plain, autocast in zip(*results):
        assert torch.equal(plain, autocast)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_vmap_over_a_batch_of_calls_is_each_call(backend):
    """torch.func.vmap over a leading dimension (frame ids shared) gives each call's output, bit for bit."""
    ids = vk.frame_ids(3, 4, text_after=2)
    x = torch.randn(3, 2, 2, ids.numel(), 8, device=DEVICE)
    call = lambda t: vk.tar_attention(t, t, t, sigma=1.5, frames=ids.to(DEVICE), backend=backend)  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(call)(x), torch.stack([call(t) for t in x]), atol=0, rtol=0)


def test_vmap_of_a_speculating_call_with_flags_raises_naming_flags():
    """flags= takes one count for a call; a vmapped call has one for each slice (a loop of calls adds them all)."""
    ids = vk.frame_ids(3, 4)
    x = torch.randn(3, 1, 2, ids.numel(), 8, device=DEVICE)
    flags = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    call = lambda t: vk.tar_attention(t, t, t, frames=ids.to(DEVICE), backend="triton", flags=flags)  # noqa: E731
    with pytest.raises(ValueError, match="flags=: a call under torch.func.vmap has counts for each of its slices"):
        torch.func.vmap(call)(x)
    assert flags.tolist() == [0, 0]
    for t in x:
        call(t)
    assert flags[1].item() == 3 * 2 * ids.numel()


def test_torch_func_grad_raises_as_the_docs_say():
    """docs/compile-and-autograd.md: torch 2.13's register_autograd does not run under torch.func.grad. When a
    torch makes it run, this fails: then the docs' line goes, and this test checks the gradient instead."""
    x = torch.randn(1, 1, 6, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda t: vk.tar_attention(t, t, t, backend="reference").sum())(x)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "forward_ad"])
def test_forward_mode_derivatives_are_refused(transform):
    """The op has no forward-mode formula; torch ran it on the primal values and gave a tangent of 0 (jvp, jacfwd)
    or none (forward_ad), without a word."""
    x, t = torch.randn(1, 1, 6, 4, dtype=torch.float64), torch.randn(1, 1, 6, 4, dtype=torch.float64)
    call = lambda q: vk.tar_attention(q, q, q, backend="reference")  # noqa: E731
    with pytest.raises(NotImplementedError, match="tar_attention has no forward-mode derivative, and q carries a "
                                                  "tangent"):
        if transform == "jvp":
            torch.func.jvp(call, (x,), (t,))
        elif transform == "jacfwd":
            torch.func.jacfwd(call)(x)
        else:
            with torch.autograd.forward_ad.dual_level():
                call(torch.autograd.forward_ad.make_dual(x, t))


class TinyTemporalBlock(torch.nn.Module):
    """A projection + tar_attention over frames with a learnable delta: what a compiled model calls.
    Kept to few ops around the call: each one inductor compiles costs seconds of C++ on CPU."""

    def __init__(self, channels=16, heads=2, frames=10, **tar):
        super().__init__()
        self.heads, self.tar = heads, tar
        self.qkv = torch.nn.Linear(channels, 3 * channels, bias=False)
        self.delta = torch.nn.Parameter(vk.gaussian_toeplitz(frames, 2.0))

    def forward(self, x):  # x: (batch, frames, channels) -> (batch, heads, frames, channels / heads)
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return vk.tar_attention(q, k, v, delta=self.delta, **self.tar)


def eager_and_compiled(model, x, compiled):
    """Output and parameter gradients of the compiled and the eager model for one output gradient."""
    results = []
    for fn in (compiled, model):
        model.zero_grad()
        y = fn(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)))
        results.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
    return results


def test_torch_compile_fullgraph_matches_eager():
    """Inductor on CPU (the reference inside the op); fullgraph=True raises on any graph break."""
    torch.manual_seed(0)
    model = TinyTemporalBlock(max_mode="global")
    (y_c, g_c), (y_e, g_e) = eager_and_compiled(model, torch.randn(3, 10, 16),
                                                torch.compile(model, fullgraph=True))
    torch.testing.assert_close(y_c, y_e, atol=1e-6, rtol=1e-5)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_frame_ids_made_in_a_compiled_graph_are_read_on_every_call():
    """Inductor reuses one buffer for the ids of several calls (the same tensor object, rewritten by its kernels with
    no in-place version): a call from compiled code reads its ids' values again, none kept from another call's."""
    n, tar = 64, dict(sigma=0.5, strength=3.0, backend="cpu")

    def three_layouts(q):
        out = vk.tar_attention(q, q, q, frames=torch.arange(n) // 16, **tar)
        out = vk.tar_attention(out, out, out, frames=torch.arange(n) // 32, **tar)
        return vk.tar_attention(out, out, out, frames=((torch.arange(n) + 8) // 16).clamp(max=3), **tar)

    q = torch.randn(1, 2, n, 16, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(torch.compile(three_layouts, fullgraph=True)(q), three_layouts(q), atol=1e-5, rtol=0)


def test_torch_compile_traces_the_triton_backend():
    """backend="triton" (the interpreter on CPU) in a compiled graph: one opaque op each way."""
    torch.manual_seed(1)
    model = TinyTemporalBlock(frames=12, backend="triton", causal=True)
    x = torch.randn(2, 12, 16)
    (y_c, g_c), (y_e, g_e) = eager_and_compiled(model, x, torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(y_c, y_e, atol=0, rtol=0)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    model.tar["backend"] = "reference"
    (_, g_ref), _ = eager_and_compiled(model, x, model)
    for a, b in zip(g_c, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def tar_with_scalar_args(q, k, v, sigma, strength, scale, backend):
    """sigma, strength and scale as arguments of the compiled function: symbolic floats with dynamic=True."""
    return vk.tar_attention(q, k, v, sigma=sigma, strength=strength, scale=scale, max_mode="global", causal=True,
                            backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "default"])
def test_torch_compile_fullgraph_traces_validation(backend, dynamic):
    """make_problem's checks trace with symbolic sizes and floats: two shapes and two sets of scalars
    through one compiled function, outputs and gradients equal to eager."""
    torch._dynamo.reset()  # no compiled code of another parametrization
    compiled = torch.compile(tar_with_scalar_args, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for shape, scalars in (((2, 2, 6, 8), (1.5, 0.7, 0.3)), ((3, 2, 9, 8), (2.5, -0.4, 0.2))):
        g = torch.Generator().manual_seed(shape[0])
        inputs = [torch.randn(shape, generator=g, requires_grad=True) for _ in range(3)]
        grad_out = torch.randn(shape, generator=g)
        results = []
        for fn in (compiled, tar_with_scalar_args):
            out = fn(*inputs, *scalars, backend)
            results.append((out, *torch.autograd.grad(out, inputs, grad_out)))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_saved_tensor_hooks_around_a_definition_backward_are_refused_clearly(backend):
    """docs/compile-and-autograd.md: torch.func.vjp refuses saved-tensor hooks; the error names tar_attention, its
    backend and the way out, not torch's 'please open an issue'. The forward may run under them."""
    q, k, v = float64_inputs(1, 1, 6, 6, 4, 4, seed=3)
    with torch.autograd.graph.save_on_cpu():
        out = vk.tar_attention(q, k, v, backend=backend)
    out.sum().backward()  # hooks around the forward only: fine
    out = vk.tar_attention(q, k, v, backend=backend)
    with pytest.raises(RuntimeError, match=f"tar_attention: the '{backend}' backend's backward runs torch.func.vjp, "
                                           "which PyTorch refuses while saved-tensor hooks are active"):
        with torch.autograd.graph.save_on_cpu():
            out.sum().backward()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_saved_tensor_hooks_around_a_compiled_call_are_refused_clearly(backend):
    """torch.compile traces a definition backward when it compiles the forward: a compiled call under saved-tensor
    hooks fails there, in the forward, and the error says so (it said to run the backward outside the hooks, and
    that the forward may run under them). Compiled outside them, a backward under them runs the compiled backward."""
    q, k, v = float64_inputs(1, 1, 6, 6, 4, 4, seed=3)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: vk.tar_attention(q, k, v, backend=backend), backend="aot_eager")
    with pytest.raises(Exception, match=f"tar_attention: the '{backend}' backend's backward runs torch.func.vjp, "
                                        r".* around the compiled call: torch.compile traces the backward when it "
                                        "compiles the forward"):
        with torch.autograd.graph.save_on_cpu():
            compiled(q, k, v)
    out = compiled(q, k, v)
    with torch.autograd.graph.save_on_cpu():
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    for got, want in zip(grads, reference_grads(q, k, v, torch.ones_like(out))):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)  # float64 against float64, as above


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_the_output_may_be_updated_in_place_where_the_backward_does_not_read_it(backend):
    """The definition's backward recomputes the call and keeps no output (nor returns a view, which autograd keeps
    from in-place updates): `out += x` before backward() gives the gradients of the call, as for a torch op whose
    backward does not read its result."""
    q = torch.randn(2, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(vk.tar_attention(q, q, q, backend=backend).sum(), q)[0]
    out = vk.tar_attention(q, q, q, backend=backend)
    out += 1.0
    out.sum().backward()
    torch.testing.assert_close(q.grad, expected, atol=0, rtol=0)
