"""Video Synopsis Prompting without diffusers: anchors, interpolation, the shipped synopses."""

import math
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

import vstar_kernels
from vstar_kernels import vsp
from vstar_kernels.vsp import default_anchors, interpolate_embeddings, load_synopses


def loop_interpolation(embeds, n, anchors, mode):
    """Frame-by-frame float64 evaluation of the VSP rule, for (K, L, C) embeds."""
    e = embeds.double()
    out = []
    for f in range(n):
        if f <= anchors[0]:
            out.append(e[0])
        elif f >= anchors[-1]:
            out.append(e[-1])
        else:
            j = max(i for i, a in enumerate(anchors) if a <= f)
            if mode == "same":
                out.append(e[j])
            else:
                t = (f - anchors[j]) / (anchors[j + 1] - anchors[j])
                out.append((1 - t) * e[j] + t * e[j + 1])
    return torch.stack(out)


@pytest.mark.parametrize("n,k", [(32, 5), (16, 1), (16, 2), (7, 7), (300, 4), (129, 3), (50, 8), (11, 7)])
def test_default_anchors_are_truncated_even_spacing(n, k):
    expected = [0] if k == 1 else [math.floor(Fraction(i * (n - 1), k - 1)) for i in range(k)]
    assert default_anchors(n, k) == expected
    assert default_anchors(n, k)[-1] == (n - 1 if k > 1 else 0)


def test_default_anchors_paper_example_and_long_videos():
    assert default_anchors(32, 5) == [0, 7, 15, 23, 31]
    assert default_anchors(300, 3) == [0, 149, 299]  # past 127: no int8 overflow


CASES = [
    # (batch, K, N, anchors)
    (None, 1, 8, None),
    (None, 2, 8, None),
    (None, 5, 32, None),
    (2, 3, 200, None),
    (3, 4, 9, None),
    (None, 3, 10, [2, 5, 6]),     # frames before the first and after the last anchor
    (2, 2, 130, torch.tensor([0, 129])),
]


@pytest.mark.parametrize("mode", ["linear", "same"])
@pytest.mark.parametrize("batch,k,n,anchors", CASES,
                         ids=[f"B{b}-K{k}-N{n}-{'given' if a is not None else 'default'}" for b, k, n, a in CASES])
def test_interpolation_matches_frame_by_frame_rule(batch, k, n, anchors, mode):
    torch.manual_seed(k * 100 + n)
    shape = (k, 5, 6) if batch is None else (batch, k, 5, 6)
    embeds = torch.randn(shape)
    out = interpolate_embeddings(embeds, n, mode=mode, anchors=anchors)
    assert out.shape == ((n, 5, 6) if batch is None else (batch, n, 5, 6))
    assert out.dtype == embeds.dtype
    used = default_anchors(n, k) if anchors is None else [int(a) for a in anchors]
    videos = [embeds] if batch is None else list(embeds)
    outs = [out] if batch is None else list(out)
    for e, o in zip(videos, outs):
        torch.testing.assert_close(o.double(), loop_interpolation(e, n, used, mode), atol=1e-6, rtol=1e-6)
        for j, a in enumerate(used):
            assert torch.equal(o[a], e[j]), f"anchor frame {a} does not hold state {j} exactly"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_equal_states_stay_exactly_equal(dtype):
    state = torch.randn(5, 6).to(dtype)
    out = interpolate_embeddings(state.expand(4, 5, 6), 23, mode="linear")
    assert out.dtype == dtype
    assert torch.equal(out, state.expand(23, 5, 6))


def test_anchor_frames_hold_their_state_exactly_even_when_it_is_not_finite():
    """lerp gave inf + 0 * (1 - inf) = NaN at an anchor beside an infinite state."""
    e = torch.tensor([[[math.inf, 1.0]], [[1.0, 1.0]], [[-math.inf, 2.0]]])
    out = interpolate_embeddings(e, 7)
    anchors = default_anchors(7, 3)
    assert torch.equal(out[anchors], e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_one_rounding_from_exact(dtype):
    torch.manual_seed(0)
    e = torch.randn(2, 64, 32).to(dtype)
    out = interpolate_embeddings(e, 7)
    exact = loop_interpolation(e, 7, [0, 6], "linear")
    # rounding the exact value once: relative error <= eps / 2 (plus float32-level absolute error
    # where the two states nearly cancel); lerp in the low-precision dtype itself is far off
    torch.testing.assert_close(out.double(), exact, atol=1e-6, rtol=torch.finfo(dtype).eps / 2)


BAD = [
    (dict(embeds=[[0.0]], num_frames=4), TypeError, "embeds must be a torch.Tensor"),
    (dict(embeds=torch.ones(2, 3, 4, dtype=torch.long), num_frames=4), TypeError, "floating-point"),
    (dict(embeds=torch.ones(2, 3, 4).to_sparse(), num_frames=4), TypeError, "embeds must be a dense"),
    (dict(embeds=torch.ones(3, 4), num_frames=4), ValueError, r"\(K, L, C\) or \(B, K, L, C\)"),
    (dict(embeds=torch.ones(0, 3, 4), num_frames=4), ValueError, "at least one state"),
    (dict(embeds=torch.ones(2, 3, 4), num_frames=0), ValueError, "num_frames must be >= 1"),
    (dict(embeds=torch.ones(2, 3, 4), num_frames=4.0), TypeError, "num_frames must be an int"),
    # (the message named default_anchors' num_states, which interpolate_embeddings does not take)
    (dict(embeds=torch.ones(5, 3, 4), num_frames=4), ValueError,
     r"num_frames \(4\) must be at least the number of states: embeds holds 5 states"),
    (dict(embeds=torch.ones(5, 3, 4), num_frames=4, anchors=[0, 1, 2, 3, 4]), ValueError,
     r"num_frames \(4\) must be at least the number of states: embeds holds 5 states"),
    (dict(embeds=torch.ones(2, 3, 4), num_frames=4, mode="cubic"), ValueError, "mode must be one of"),
    (dict(embeds=torch.ones(2, 3, 4), num_frames=4, anchors=[3, 1]), ValueError, "strictly increasing"),
    (dict(embeds=torch.ones(2, 3, 4), num_frames=4, anchors=[1, 1]), ValueError, "strictly increasing"),
    (dict(embeds=torch.ones(2, 3, 4), num_frames=4, anchors=[0, 4]), ValueError, r"\[0, 3\].*\[4\]"),
    (dict(embeds=torch.ones(2, 3, 4), num_frames=4, anchors=[-1, 2]), ValueError, r"in \[0, 3\]"),
    (dict(embeds=torch.ones(2, 3, 4), num_frames=4, anchors=[0, 1, 2]), ValueError, "3 entries but embeds holds 2"),
    (dict(embeds=torch.ones(2, 3, 4), num_frames=4, anchors=[0, 1.5]), TypeError, "anchors must be ints"),
    (dict(embeds=torch.ones(2, 3, 4), num_frames=4, anchors=torch.tensor([0.0, 3.0])), TypeError, "integer tensor"),
    (dict(embeds=torch.ones(2, 3, 4), num_frames=4, anchors=5), TypeError, "sequence of ints"),
    # a set has no order (one of {1, 2, 8} was taken, another refused, by hash order)
    (dict(embeds=torch.ones(2, 3, 4), num_frames=4, anchors={0, 3}), TypeError, "in frame order, got a set"),
    (dict(embeds=torch.ones(2, 3, 4), num_frames=4, anchors={0: 0, 3: 1}), TypeError, "in frame order, got a dict"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_arguments_raise_clear_errors(kwargs, exc, match):
    kwargs = dict(kwargs)
    with pytest.raises(exc, match=match):
        interpolate_embeddings(kwargs.pop("embeds"), kwargs.pop("num_frames"), **kwargs)


def test_shipped_synopses_are_usable():
    examples = load_synopses()
    assert len(examples) >= 10
    prompts = [ex["prompt"] for ex in examples]
    assert "a boy is getting old" in prompts  # the paper's one-shot example for the LLM
    assert "A peony starts to bloom, in the field" in prompts
    for ex in examples:
        assert isinstance(ex["prompt"], str) and ex["prompt"].strip()
        assert len(ex["synopsis"]) >= 2
        assert all(isinstance(s, str) and s.strip() for s in ex["synopsis"])
        # each state gets its own anchor frame in a 16-frame video
        k = len(ex["synopsis"])
        assert len(set(default_anchors(16, k))) == k


def test_old_spelling_of_the_diffusers_names_warns_and_returns_them():
    from vstar_kernels.diffusers import apply_vsp

    with pytest.warns(DeprecationWarning, match="vstar_kernels.vsp.apply_vsp is deprecated"):
        assert vsp.apply_vsp is apply_vsp


def test_diffusers_names_need_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    for name in ("vstar_kernels.diffusers", "vstar_kernels.diffusers.vsp"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delattr(vstar_kernels, "diffusers", raising=False)
    with pytest.raises(ImportError, match=r"vstar_kernels.diffusers needs the diffusers package"), \
            pytest.warns(DeprecationWarning, match="use vstar_kernels.diffusers.apply_vsp"):
        vsp.apply_vsp  # noqa: B018
    assert interpolate_embeddings(torch.ones(1, 2, 3), 4).shape == (4, 2, 3)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        vsp.not_a_name  # noqa: B018


def test_importing_vsp_does_not_import_diffusers():
    code = "import sys, vstar_kernels.vsp, vstar_kernels.analysis; assert 'diffusers' not in sys.modules; " \
           "assert 'matplotlib' not in sys.modules"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
