"""Bad input raises a clear error naming the argument, on every entry point."""

import math
import re

import numpy as np
import pytest
import torch

import vstar_kernels as vk

ENTRY_POINTS = [vk.tar_attention, vk.tar_attention_reference]


def qkv(*shape, dtype=torch.float32):
    return tuple(torch.randn(*shape, dtype=dtype) for _ in range(3))


@pytest.fixture(params=ENTRY_POINTS, ids=["tar_attention", "reference"])
def fn(request):
    return request.param


CASES = [
    ("q not a tensor", lambda: ([[1.0]], *qkv(1, 1, 4, 8)[1:]), {}, TypeError, "q must be a torch.Tensor"),
    ("sparse q", lambda: (torch.randn(1, 1, 4, 8).to_sparse(), *qkv(1, 1, 4, 8)[1:]), {}, TypeError,
     "q must be a dense \\(strided\\) tensor, got layout torch.sparse_coo"),
    ("mkldnn v", lambda: (*qkv(1, 1, 4, 8)[:2], torch.randn(1, 1, 4, 8).to_mkldnn()), {}, TypeError,
     "v must be a dense \\(strided\\) tensor, got layout torch._mkldnn"),
    ("nested k", lambda: (torch.randn(1, 1, 4, 8), torch.nested.nested_tensor([torch.randn(1, 4, 8)]),
                          torch.randn(1, 1, 4, 8)), {}, TypeError,
     "k must be a dense \\(strided\\) tensor, got a nested"),
    ("sparse frames", lambda: qkv(1, 1, 4, 8), dict(frames=torch.tensor([0, 0, 1, 1]).to_sparse()), TypeError,
     "frames must be a dense \\(strided\\) tensor"),
    ("sparse key_mask", lambda: qkv(1, 1, 4, 8), dict(key_mask=torch.ones(1, 4, dtype=torch.bool).to_sparse()),
     TypeError, "key_mask must be a dense \\(strided\\) tensor"),
    ("integer dtype", lambda: (torch.ones(1, 1, 4, 8, dtype=torch.int32), *qkv(1, 1, 4, 8)[1:]), {}, TypeError,
     "q must be a floating-point"),
    ("mixed dtypes", lambda: (*qkv(1, 1, 4, 8)[:2], torch.randn(1, 1, 4, 8, dtype=torch.float64)), {}, TypeError,
     "v has dtype"),
    ("5-D input", lambda: qkv(1, 1, 1, 4, 8), {}, ValueError, "q must be 3-D"),
    ("2-D input", lambda: qkv(4, 8), {}, ValueError, "q must be 3-D"),
    ("rank mismatch", lambda: (torch.randn(1, 1, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)), {}, ValueError,
     "k is 3-D but q is 4-D"),
    ("head dim mismatch", lambda: (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 6), torch.randn(1, 1, 4, 8)), {},
     ValueError, "k has head dim 6"),
    ("kv length mismatch", lambda: (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 4, 8)), {},
     ValueError, "v has 4 keys but k has 5"),
    ("batch mismatch", lambda: (torch.randn(2, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)), {},
     ValueError, "k has batch/heads"),
    ("no keys", lambda: (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 0, 8), torch.randn(1, 1, 0, 8)), {},
     ValueError, "at least one key"),
    ("sigma zero", lambda: qkv(1, 1, 4, 8), dict(sigma=0.0), ValueError, "sigma must be > 0"),
    ("sigma negative", lambda: qkv(1, 1, 4, 8), dict(sigma=-2), ValueError, "sigma must be > 0"),
    ("sigma nan", lambda: qkv(1, 1, 4, 8), dict(sigma=math.nan), ValueError, "sigma must be > 0"),
    ("sigma string", lambda: qkv(1, 1, 4, 8), dict(sigma="1"), TypeError, "sigma must be a real number"),
    ("sigma huge int", lambda: qkv(1, 1, 4, 8), dict(sigma=10**400), ValueError, "sigma must be within the float"),
    ("strength huge int", lambda: qkv(1, 1, 4, 8), dict(strength=-10**400), ValueError,
     "strength must be within the float"),
    ("strength inf", lambda: qkv(1, 1, 4, 8), dict(strength=math.inf), ValueError, "strength must be finite"),
    ("strength bool", lambda: qkv(1, 1, 4, 8), dict(strength=True), TypeError, "strength must be a real number"),
    ("scale nan", lambda: qkv(1, 1, 4, 8), dict(scale=math.nan), ValueError, "scale must be finite"),
    ("scale zero", lambda: qkv(1, 1, 4, 8), dict(scale=0), ValueError, r"scale must be > 0 \(.*\), got 0.0"),
    ("scale negative", lambda: qkv(1, 1, 4, 8), dict(scale=-1), ValueError, "scale must be > 0 .*got -1.0"),
    ("scale string", lambda: qkv(1, 1, 4, 8), dict(scale="0.1"), TypeError, "scale must be a real number"),
    ("strength beyond float32", lambda: qkv(1, 1, 4, 8), dict(strength=1e39), ValueError,
     r"strength must be finite with \|strength\| <= 3.4028234663852886e\+38 \(the largest float32"),
    ("scale beyond float32", lambda: qkv(1, 1, 4, 8, dtype=torch.float16), dict(scale=-1e39), ValueError,
     r"scale must be finite with \|scale\| <= 3.4028234663852886e\+38"),
    ("strength beyond float64", lambda: qkv(1, 1, 4, 8, dtype=torch.float64), dict(strength=-math.inf), ValueError,
     r"\|strength\| <= 1.7976931348623157e\+308 \(the largest float64"),
    ("sigma string with delta", lambda: qkv(1, 1, 4, 8), dict(sigma="abc", delta=torch.rand(4, 4)), TypeError,
     "sigma must be a real number"),
    ("sigma negative with delta", lambda: qkv(1, 1, 4, 8), dict(sigma=-1.0, delta=torch.rand(4, 4)), ValueError,
     "sigma must be > 0"),
    ("max_mode", lambda: qkv(1, 1, 4, 8), dict(max_mode="col"), ValueError, "max_mode must be one of"),
    ("causal not bool", lambda: qkv(1, 1, 4, 8), dict(causal=1), TypeError, "causal must be a bool"),
    ("causal numpy bool", lambda: qkv(1, 1, 4, 8), dict(causal=np.bool_(True)), TypeError,
     "causal must be a bool, got numpy.bool"),
    ("delta wrong shape", lambda: qkv(2, 3, 4, 8), dict(delta=torch.rand(5, 4)), ValueError,
     r"delta has shape \(5, 4\)"),
    ("delta too many dims", lambda: qkv(2, 3, 4, 8), dict(delta=torch.rand(1, 2, 3, 4, 4)), ValueError,
     "delta has 5 dims"),
    ("delta integer", lambda: qkv(2, 3, 4, 8), dict(delta=torch.ones(4, 4, dtype=torch.int64)), TypeError,
     "delta must be a floating-point"),
    ("delta not tensor", lambda: qkv(2, 3, 4, 8), dict(delta=[[1.0]]), TypeError, "delta must be a torch.Tensor"),
]


@pytest.mark.parametrize("name,make,kwargs,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input(fn, name, make, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(*make(), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_the_bound_a_factor_is_refused_past_is_taken(fn, dtype):
    """The largest strength and scale that the message names (the compute dtype's largest value, printed to the
    last digit) are taken; they once printed rounded up, to a number that was itself refused."""
    q, k, v = qkv(1, 1, 4, 8, dtype=dtype)
    with pytest.raises(ValueError, match="strength must be finite") as refused:
        fn(q, k, v, strength=math.inf)
    bound = float(re.search(r"<= (\S+) \(", str(refused.value)).group(1))
    assert bound == torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max
    for factor in ("strength", "scale"):
        assert fn(q, k, v, **{factor: bound}).shape == q.shape


def test_different_devices(fn):
    q, k, v = qkv(1, 1, 4, 8)
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        fn(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="delta is on meta"):
        fn(q, k, v, delta=torch.empty(4, 4, device="meta"))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        vk.tar_attention(*qkv(1, 1, 4, 8), backend="flash")


def test_empty_batch_and_queries():
    q, k, v = torch.randn(0, 2, 4, 8), torch.randn(0, 2, 4, 8), torch.randn(0, 2, 4, 8)
    assert vk.tar_attention(q, k, v).shape == (0, 2, 4, 8)
    q = torch.randn(1, 2, 0, 8)
    k = v = torch.randn(1, 2, 4, 8)
    assert vk.tar_attention(q, k, v).shape == (1, 2, 0, 8)


@pytest.mark.parametrize("opts", [dict(), dict(causal=True, max_mode="global"), dict(delta=True), dict(frames=True),
                                  dict(frames=True, delta=True, key_mask=True)], ids=lambda o: ",".join(o) or "plain")
def test_meta_inputs_give_a_meta_result_of_the_output_shape(fn, opts):
    """All-meta inputs (what torch.compile's fake tensors and shape inference pass) give a meta output of
    the call's shape: no value is read (the checks of the ids' values need values, and are left out)."""
    q, k, v = (torch.empty(2, 3, 8, d, device="meta") for d in (4, 4, 5))
    ids = vk.frame_ids(2, 3, text_before=2, device="meta")
    tensors = dict(delta=torch.empty(2, 2, device="meta") if opts.get("frames") else torch.empty(8, 8, device="meta"),
                   frames=ids, key_mask=torch.ones(2, 8, dtype=torch.bool, device="meta"))
    out = fn(q, k, v, **{name: tensors[name] if name in tensors else value for name, value in opts.items()})
    assert out.device.type == "meta" and out.shape == (2, 3, 8, 5) and out.dtype == torch.float32


@pytest.mark.parametrize("dynamic", [None, True])
def test_a_delta_that_does_not_broadcast_is_named_under_torch_compile(dynamic):
    """The broadcast check is a comparison of sizes, which torch.compile traces (symbolic ones too): a compiled call
    raises the eager call's ValueError, not the error of an expand on fake tensors."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, delta: vk.tar_attention(q, q, q, delta=delta, backend="reference"),
                             backend="eager", dynamic=dynamic)
    with pytest.raises(ValueError, match=r"delta has shape \(5, 6\), which does not broadcast"):
        compiled(torch.randn(1, 2, 4, 8), torch.rand(5, 6))
