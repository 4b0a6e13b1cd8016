"""apply_tar_to_modules on a small network of lvdm-style attention modules laid out like VideoCrafter2's UNet.

`LvdmAttention` follows lvdm's attention interface and math (written here from its description:
heads split from the last dim, ``softmax(q k^T * scale) v``, Linear + Dropout out). `ToyUNet` names
its modules as VideoCrafter2 does (``input_blocks.<i>.<j>``, ``middle_block``, ``output_blocks``,
``init_attn``) so that the README's `select` function is exercised on the same names.
"""

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vstar_kernels.lvdm import (
    LevelSpec,
    TARConfig,
    _TARForward,
    apply_tar_to_modules,
    remove_tar_from_modules,
    set_step,
    tar_modules,
)
from vstar_kernels.regularization import delta_from_features

from ..helpers import assert_close_to_reference, naive_tar
from .tiny_video_models import one_torch_thread  # noqa: F401 (autouse fixture)

DIM = 16


class LvdmAttention(torch.nn.Module):
    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        self.to_k = torch.nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = torch.nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.Dropout(0.0))

    def forward(self, x, context=None, mask=None, time_index=None):  # VSTAR's lvdm passes time_index, unread
        context = x if context is None else context
        b, h = x.shape[0], self.heads

        def split(t):  # (b, n, h * d) -> (b * h, n, d), an empty batch too (as lvdm's einops rearrange)
            return t.unflatten(-1, (h, -1)).transpose(1, 2).flatten(0, 1)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        sim = torch.einsum("bid,bjd->bij", q, k) * self.scale
        if mask is not None:
            sim = sim.masked_fill(~(mask.repeat_interleave(h, dim=0) > 0.5), -torch.finfo(sim.dtype).max)
        out = torch.einsum("bij,bjd->bid", sim.softmax(dim=-1), v)
        out = out.unflatten(0, (b, h)).transpose(1, 2).flatten(2)
        return self.to_out(out)


class Block(torch.nn.Module):
    def __init__(self, heads):
        super().__init__()
        self.attn1 = LvdmAttention(DIM, heads)
        self.attn2 = LvdmAttention(DIM, heads)

    def forward(self, x):
        x = x + self.attn1(x)
        return x + self.attn2(x)


class TemporalTransformer(torch.nn.Module):  # lvdm's class name: the README's select looks for it
    def __init__(self, heads):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([Block(heads)])


class SpatialTransformer(TemporalTransformer):
    pass


def level_block(heads):
    return torch.nn.Sequential(torch.nn.Identity(), SpatialTransformer(heads), TemporalTransformer(heads))


class ToyUNet(torch.nn.Module):
    """Temporal attention at levels 0 (2 heads), 1 (4 heads) and 3 (middle), plus init_attn and spatial ones."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.init_attn = torch.nn.Sequential(TemporalTransformer(2))
        self.input_blocks = torch.nn.ModuleList(
            [torch.nn.Identity(), level_block(2), level_block(2), torch.nn.Identity(), level_block(4)])
        self.middle_block = level_block(8)
        self.output_blocks = torch.nn.ModuleList([torch.nn.Identity() for _ in range(6)] + [level_block(4)] +
                                                 [torch.nn.Identity() for _ in range(2)] + [level_block(2)])

    def forward(self, x):
        for module in self.modules():
            if isinstance(module, Block):
                x = module(x)
        return x


def videocrafter2_select(model):
    """The README's select for VideoCrafter2's UNet (written out here so that it runs in CI)."""
    modules = dict(model.named_modules())

    def select(name, module):
        parent = name.rsplit(".transformer_blocks.", 1)[0]
        if not name.endswith((".attn1", ".attn2")) or type(modules.get(parent)).__name__ != "TemporalTransformer":
            return None
        block, _, rest = name.partition(".")
        if block == "input_blocks":
            return (int(rest.split(".")[0]) - 1) // 3
        if block == "output_blocks":
            return 3 - int(rest.split(".")[0]) // 3
        return 3 if block == "middle_block" else None

    return select


EXPECTED = {f"{block}.2.transformer_blocks.0.{attn}": level
            for block, level in [("input_blocks.1", 0), ("input_blocks.2", 0), ("input_blocks.4", 1),
                                 ("output_blocks.6", 1), ("output_blocks.9", 0)]
            for attn in ("attn1", "attn2")}


def video(rows=6, frames=8, seed=1):
    return torch.randn(rows, frames, DIM, generator=torch.Generator().manual_seed(seed))


def run_recording(model, x):
    """Forward once; {name: (input, output)} of every LvdmAttention call."""
    calls = {}
    handles = [m.register_forward_hook(lambda m, args, out, name=name: calls.__setitem__(name, (args[0], out)))
               for name, m in model.named_modules() if isinstance(m, LvdmAttention)]
    with torch.no_grad():
        out = model(x)
    for h in handles:
        h.remove()
    return out, calls


def attention64(module, x, **tar):
    """The module's output in float64 with TAR (naive_tar) between the projections and to_out."""
    def linear(layer, t):
        return F.linear(t.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())

    b, n, _ = x.shape
    q, k, v = (linear(p, x).view(b, n, module.heads, -1).transpose(1, 2) for p in (module.to_q, module.to_k,
                                                                                   module.to_v))
    out = naive_tar(q, k, v, scale=module.scale, **tar).transpose(1, 2).reshape(b, n, -1)
    return linear(module.to_out[0], out)


def test_select_finds_videocrafter2_temporal_attention_and_tar_matches_float64():
    model = ToyUNet()
    dict(model.named_modules())["input_blocks.4.2.transformer_blocks.0.attn1"].scale = 0.3  # not head_dim ** -0.5
    x = video()
    plain_out, _ = run_recording(model, x)
    config = TARConfig(levels={0: (1.0, 1.0), 1: (2.0, 0.5)}, until_step=None)
    names = apply_tar_to_modules(model, config, select=videocrafter2_select(model))
    assert sorted(names) == sorted(EXPECTED)
    assert {name: level for name, level, _ in tar_modules(model)} == EXPECTED
    out, calls = run_recording(model, x)
    assert (out - plain_out).abs().max() > 1e-3
    for name, (inp, result) in calls.items():
        module = dict(model.named_modules())[name]
        if name in EXPECTED:
            sigma, strength = {0: (1.0, 1.0), 1: (2.0, 0.5)}[EXPECTED[name]]
            assert_close_to_reference(result, attention64(module, inp, sigma=sigma, strength=strength))
        else:  # init_attn, spatial and the middle block (level 3, not configured): the module's own forward
            assert "forward" not in vars(module)
            assert torch.equal(result, module.forward(inp))


def test_step_gate_follows_set_step():
    model = ToyUNet()
    x = video(rows=2)
    plain, _ = run_recording(model, x)
    apply_tar_to_modules(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=1), select=videocrafter2_select(model))
    with pytest.raises(RuntimeError, match=r"input_blocks\.1\.2\.transformer_blocks\.0\.attn1: TAR runs on steps "
                                           r"0\.\.1 only.*set_step\(model, i\)"):
        run_recording(model, x)
    outs = []
    for step in (0, 1, 2, 3, 0):
        set_step(model, step)
        outs.append(run_recording(model, x)[0])
    assert (outs[0] - plain).abs().max() > 1e-3
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[4], outs[0])
    assert torch.equal(outs[2], plain) and torch.equal(outs[3], plain)


def test_compiled_the_step_gate_compiles_once_on_and_once_off():
    """The patched forwards read the step set_step gave, a guard of torch.compile: the model compiled again at
    every step (and after dynamo's limit of 8 ran eagerly). They read whether it is regularized now."""
    from torch._dynamo.testing import CompileCounter

    model = ToyUNet()
    x = video(rows=2)
    apply_tar_to_modules(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=1), select=videocrafter2_select(model))
    expected = []
    for step in range(4):
        set_step(model, step)
        expected.append(run_recording(model, x)[0])
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    frames = []
    for step, out in enumerate(expected):
        set_step(model, step)
        with torch.no_grad():
            assert torch.equal(compiled(x), out)
        frames.append(counter.frame_count)
    assert frames[0] == frames[1] < frames[2] == frames[3], frames


def test_remove_restores_every_module_exactly():
    model = ToyUNet()
    x = video()
    plain, _ = run_recording(model, x)
    fast = dict(model.named_modules())["input_blocks.2.2.transformer_blocks.0.attn2"]
    fast.forward = fast.forward  # an instance-level forward, as lvdm sets when it picks xformers
    own_forward = vars(fast)["forward"]
    before = {name: dict(vars(m)) for name, m in model.named_modules()}

    apply_tar_to_modules(model, TARConfig.from_preset("64D1_32D8", until_step=None), select=videocrafter2_select(model))
    apply_tar_to_modules(model, TARConfig.from_preset("64D1"), select=videocrafter2_select(model))  # replaces
    assert len(tar_modules(model)) == 6
    remove_tar_from_modules(model)
    remove_tar_from_modules(model)  # nothing applied: a no-op

    after = {name: dict(vars(m)) for name, m in model.named_modules()}
    assert after.keys() == before.keys()
    for name in before:
        assert after[name].keys() == before[name].keys(), name
        assert all(after[name][k] is before[name][k] for k in before[name]), name
    assert vars(fast)["forward"] is own_forward
    assert torch.equal(run_recording(model, x)[0], plain)
    with pytest.raises(ValueError, match="no TAR modules: call apply_tar_to_modules first"):
        set_step(model, 0)


def test_a_forward_set_after_tar_stays_through_remove():
    """remove_tar_from_modules put back the forward from before TAR, dropping a wrapper set on the module since
    (which calls TAR's patch): the wrapper stays, running the module's own forward through TAR's removed patch."""
    model = ToyUNet()
    x = video(rows=2)
    attn = dict(model.named_modules())["input_blocks.1.2.transformer_blocks.0.attn1"]
    with torch.no_grad():
        plain = attn(x)
    apply_tar_to_modules(model, TARConfig.from_preset("64D1", until_step=1), select=videocrafter2_select(model))
    patch, calls = attn.forward, []

    def wrapper(*args, **kwargs):
        calls.append(args)
        return patch(*args, **kwargs)

    attn.forward = wrapper
    set_step(model, 0)
    with torch.no_grad():
        regularized = attn(x)
        assert not torch.equal(regularized, plain)
        remove_tar_from_modules(model)
        assert vars(attn)["forward"] is wrapper and torch.equal(attn(x), plain) and len(calls) == 2
        apply_tar_to_modules(model, TARConfig.from_preset("64D1", until_step=None),
                             select=videocrafter2_select(model))  # above the wrapper, then removed again
        assert torch.equal(attn(x), regularized) and len(calls) == 2
        remove_tar_from_modules(model)
        assert vars(attn)["forward"] is wrapper and torch.equal(attn(x), plain) and len(calls) == 3


def test_a_part_of_the_patched_model_or_its_copy_is_named_to_set_step_and_remove():
    """remove_tar_from_modules on a part of the model TAR was applied to (or on a copy of a part, whose patches
    nothing reaches) did nothing, silently, and set_step said the part had no TAR modules: both name the model."""
    model = ToyUNet()
    apply_tar_to_modules(model, TARConfig.from_preset("64D1"), select=videocrafter2_select(model))
    for part in (model.input_blocks, copy.deepcopy(model.input_blocks), dict(model.named_modules())[
            "input_blocks.1.2.transformer_blocks.0.attn1"]):
        for call, args in ((remove_tar_from_modules, ()), (set_step, (0,))):
            with pytest.raises(ValueError, match=rf"^{call.__name__}: \w+ holds TAR's patch \(at [\w.]+\) but not "
                                                 rf"its state, .* call {call.__name__} on that model$"):
                call(part, *args)
    holder = torch.nn.ModuleDict({"unet": model})  # (a model holding the one TAR was applied to)
    with pytest.raises(ValueError, match=r"^remove_tar_from_modules: ModuleDict holds TAR's patch .* held by it"):
        remove_tar_from_modules(holder)
    attn = model.input_blocks[1][2].transformer_blocks[0].attn1
    patch = vars(attn)["forward"]
    assert isinstance(patch, _TARForward)
    attn.forward = lambda *args, **kwargs: patch(*args, **kwargs)  # a forward set since TAR, which removal keeps
    remove_tar_from_modules(model)
    attn.forward = patch  # put back by its owner: TAR's removed patch, no TAR's anymore
    for again in (model, model.input_blocks, holder):  # no TAR anywhere: a no-op, as before
        remove_tar_from_modules(again)
    apply_tar_to_modules(model, TARConfig.from_preset("64D1"), select=videocrafter2_select(model))
    remove_tar_from_modules(model)


@pytest.mark.parametrize("copy_model", [copy.deepcopy, lambda model: pickle.loads(pickle.dumps(model))],
                         ids=["deepcopy", "pickle"])
def test_a_copy_of_a_patched_model_runs_tar_and_removes_it(copy_model):
    # an EMA copy, or a whole model saved with torch.save: the copy's modules get back their own forward
    model = ToyUNet()
    x = video()
    plain, _ = run_recording(model, x)
    fast = dict(model.named_modules())["input_blocks.2.2.transformer_blocks.0.attn1"]
    fast.forward = fast.forward  # an instance-level forward, as lvdm sets when it picks xformers
    apply_tar_to_modules(model, TARConfig.from_preset("64D1", until_step=1), select=videocrafter2_select(model))
    set_step(model, 0)
    tar_out, _ = run_recording(model, x)
    copied = copy_model(model)
    assert torch.equal(run_recording(copied, x)[0], tar_out)
    set_step(copied, 2)  # the modules' own forward, on the copy
    assert torch.equal(run_recording(copied, x)[0], plain)
    remove_tar_from_modules(copied)
    assert not [name for name, m in copied.named_modules() if "forward" in vars(m)
                and not callable(vars(m)["forward"])]
    assert torch.equal(run_recording(copied, x)[0], plain)
    assert torch.equal(run_recording(model, x)[0], tar_out)  # the original keeps TAR


def test_a_module_patched_through_another_root_is_refused():
    """TAR applied to the UNet, then to a model holding it: removing it from the outer model would have put the
    UNet's patch back as the module's own forward (TAR on, tar_modules empty). Refused, naming the module; nothing
    changes, and the UNet's own TAR is removed as applied."""
    unet = ToyUNet()
    outer = torch.nn.Sequential(unet)
    x = video()
    plain, _ = run_recording(unet, x)
    apply_tar_to_modules(unet, TARConfig.from_preset("64D1", until_step=None), select=videocrafter2_select(unet))
    patched = run_recording(unet, x)[0]
    with pytest.raises(ValueError, match=r"0\.input_blocks\..*: TAR is applied to it already, through another model"):
        inner = videocrafter2_select(unet)
        apply_tar_to_modules(outer, TARConfig.from_preset("64D1", until_step=None),
                             select=lambda name, module: inner(name[2:], module) if name.startswith("0.") else None)
    assert tar_modules(outer) == [] and torch.equal(run_recording(unet, x)[0], patched)
    remove_tar_from_modules(unet)
    assert torch.equal(run_recording(unet, x)[0], plain)


def test_outside_regularized_steps_the_previous_forward_runs_with_its_arguments():
    model = ToyUNet()
    select = videocrafter2_select(model)
    apply_tar_to_modules(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=0), select=select)
    attn = dict(model.named_modules())["input_blocks.1.2.transformer_blocks.0.attn1"]
    x = video(rows=3, frames=5)
    mask = torch.ones(3, 5, 5).tril()
    set_step(model, 1)
    with torch.no_grad():
        masked = attn(x, mask=mask)
        remove_tar_from_modules(model)
        assert torch.equal(masked, attn(x, mask=mask))
    apply_tar_to_modules(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=0), select=select)
    set_step(model, 0)
    with pytest.raises(ValueError, match="attn1: TAR takes no mask"), torch.no_grad():
        attn(x, mask=mask)
    with pytest.raises(ValueError, match="attn1: TAR regularizes self-attention over frames.*context"):
        attn(x, torch.randn(3, 4, DIM))
    with torch.no_grad():
        assert torch.equal(attn(x, context=x), attn(x))  # the context of self-attention is x itself


def test_an_empty_batch_gives_an_empty_output_as_the_modules_do():
    """The patch reshaped TAR's output to (batch, frames, -1) channels, which torch cannot infer for 0 rows."""
    model = ToyUNet()
    x = video(rows=0)
    assert run_recording(model, x)[0].shape == x.shape  # lvdm's attention (einops) takes an empty batch
    apply_tar_to_modules(model, TARConfig.from_preset("64D1", until_step=None), select=videocrafter2_select(model))
    out, calls = run_recording(model, x)
    assert out.shape == x.shape and EXPECTED.keys() <= calls.keys()
    assert all(result.shape == x.shape for _, result in calls.values())


def test_delta_level_matches_float64_and_rejects_other_frame_counts():
    model = ToyUNet()
    delta = delta_from_features(torch.randn(10, 4, generator=torch.Generator().manual_seed(2)).cumsum(0),
                                num_frames=8)
    apply_tar_to_modules(model, TARConfig(levels={0: LevelSpec(delta=delta, strength=0.5)}, until_step=None),
                         select=videocrafter2_select(model))
    x = video()
    _, calls = run_recording(model, x)
    modules = dict(model.named_modules())
    for name, level in EXPECTED.items():
        if level == 0:
            inp, result = calls[name]
            assert_close_to_reference(result, attention64(modules[name], inp, strength=0.5, delta=delta))
    with pytest.raises(ValueError, match=r"delta is 8 x 8 but this attention runs over 6 frames"):
        run_recording(model, video(frames=6))


def test_triton_backend_gives_the_reference_output():
    model = ToyUNet()
    x = video(rows=3)
    outs = {}
    for backend in ("reference", "triton"):
        apply_tar_to_modules(model, TARConfig(levels={0: (1.0, 1.0), 1: (8.0, 1.0)}, until_step=None,
                                              backend=backend), select=videocrafter2_select(model))
        outs[backend] = run_recording(model, x)[0]
    torch.testing.assert_close(outs["triton"], outs["reference"], atol=2e-5, rtol=2e-5)


class NotAttention(torch.nn.Module):
    def __init__(self, **attrs):
        super().__init__()
        self.to_q = self.to_k = self.to_v = torch.nn.Identity()
        self.to_out = torch.nn.Identity()
        self.heads, self.scale = 2, 1.0
        for key, value in attrs.items():
            setattr(self, key, value)


@pytest.mark.parametrize("select, error, match", [
    pytest.param(lambda name, m: None, ValueError, "select returned a level for no module", id="none"),
    pytest.param(lambda name, m: -1 if name == "init_attn" else None, ValueError,
                 r"select\('init_attn', \.\.\.\) returned -1", id="negative"),
    pytest.param(lambda name, m: 1 if name.endswith("attn1") else None, ValueError,
                 r"config levels \[0\] have no module: select put modules at levels \[1\]", id="missing-level"),
    pytest.param(lambda name, m: 0 if name == "input_blocks.1.1" else None, TypeError,
                 r"input_blocks\.1\.1 \(SpatialTransformer\) lacks to_q, to_k, to_v, to_out, heads, scale", id="api"),
])
def test_bad_selection_raises_and_patches_nothing(select, error, match):
    model = ToyUNet()
    with pytest.raises(error, match=match):
        apply_tar_to_modules(model, TARConfig.from_preset("64D1"), select=select)
    assert not tar_modules(model) and not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("attrs, error, match", [
    pytest.param(dict(heads=0), TypeError, "heads must be a positive int", id="heads"),
    pytest.param(dict(scale="0.5"), TypeError, "scale must be a real number", id="scale"),
    pytest.param(dict(scale=float("nan")), ValueError, r"^0: scale must be finite, got nan", id="scale-nan"),
    pytest.param(dict(to_out=torch.nn.ModuleList([torch.nn.Identity()])), TypeError, "diffusers", id="modulelist"),
    pytest.param(dict(relative_position=True), ValueError, "relative position", id="relative-position"),
])
def test_interface_checks(attrs, error, match):
    model = torch.nn.Sequential(NotAttention(**attrs))
    with pytest.raises(error, match=match):
        apply_tar_to_modules(model, TARConfig.from_preset("64D1"), select=lambda name, m: 0 if name == "0" else None)


def test_numpy_heads_are_an_int():
    model = torch.nn.Sequential(LvdmAttention(DIM, 2))
    x = video(rows=2)
    expected = attention64(model[0], x, sigma=1.0, strength=1.0)
    model[0].heads = np.int64(2)
    apply_tar_to_modules(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None),
                         select=lambda name, m: 0 if name == "0" else None)
    assert_close_to_reference(model(x), expected, torch.float32)


def test_vstar_lvdm_passes_time_index_which_the_step_overrides():
    """VSTAR's lvdm calls its attention modules with time_index= (which its attention does not read): at a
    regularized step the patch raised a TypeError naming a private helper."""
    model = ToyUNet()
    apply_tar_to_modules(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=1), select=videocrafter2_select(model))
    module = dict(model.named_modules())["input_blocks.1.2.transformer_blocks.0.attn1"]
    x = video(rows=2)
    for step in (0, 2):
        set_step(model, step)
        assert torch.equal(module(x, time_index=7), module(x))
    set_step(model, 0)
    assert not torch.equal(module(x), module.forward.original(x))


def test_a_compiled_model_is_patched_named_and_restored_as_the_model():
    """Every function took the torch.compile wrapper's own state: its names carried _orig_mod., set_step said it
    had no TAR modules and remove_tar_from_modules did nothing, leaving TAR on."""
    model = ToyUNet()
    compiled = torch.compile(model)
    names = apply_tar_to_modules(compiled, TARConfig(levels={0: (1.0, 1.0)}), select=videocrafter2_select(model))
    assert sorted(names) == sorted(name for name, level in EXPECTED.items() if level == 0)
    assert tar_modules(compiled) == tar_modules(model) and len(tar_modules(model)) == len(names)
    set_step(compiled, 0)
    remove_tar_from_modules(compiled)
    assert not tar_modules(model) and not any("forward" in vars(m) for m in model.modules())


def test_argument_errors():
    model = ToyUNet()
    select = videocrafter2_select(model)
    with pytest.raises(TypeError, match="config must be a TARConfig"):
        apply_tar_to_modules(model, {0: (1.0, 1.0)}, select=select)
    with pytest.raises(TypeError, match="select must be a function"):
        apply_tar_to_modules(model, TARConfig.from_preset("64D1"), select="temporal")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        apply_tar_to_modules(object(), TARConfig.from_preset("64D1"), select=select)
    for call in (lambda: set_step(None, 0), lambda: remove_tar_from_modules(None), lambda: tar_modules(None)):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module, got NoneType"):  # was vars()'s error
            call()
    with pytest.raises(ValueError, match="blocks= selects transformer blocks of a video DiT"):
        apply_tar_to_modules(model, TARConfig(levels={0: (1.0, 1.0)}, blocks=[0]), select=select)
    apply_tar_to_modules(model, TARConfig.from_preset("64D1"), select=select)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            set_step(model, bad)
