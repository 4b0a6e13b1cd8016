"""The ComfyUI node against a real ComfyUI: set COMFYUI_SRC to a ComfyUI checkout (skipped otherwise).

Tiny random-weight models built from ComfyUI's own classes (Wan through its state-dict loader, the
others from their supported-model configs) are sampled through ``comfy.sample.sample``. A float64
oracle computes TAR densely from its definition in an attention override of its own, on the calls
of the classes that hold the video self-attention (patched here, not through the node), with frame
ids written out from the latent's shape. The node's samples must match it, and be stock bit for bit
where TAR is off; the input model must stay as it was; an override already on the model must get
every call the node does not regularize.

The node's companions (nodes that patch the same model, newer ComfyUI's attention calls) are emulated by
comfyui_companions.py. On a ComfyUI older than 0.3.60 only the node's refusal is tested.

ComfyUI's Python requirements must be importable (PYTHONPATH may name a folder they were installed
into with ``pip install --target``): torch, einops, safetensors, psutil, scipy, torchsde,
torchvision, av, ... When torchvision's compiled operators do not load against this torch (a CUDA
wheel of torchvision with a CPU torch: "operator torchvision::nms does not exist"), their schemas
are defined here first so that it imports; nothing here calls them. ComfyUI runs on its CPU path
(``comfy.cli_args.args.cpu``).
"""

import asyncio
import copy
import logging
import math
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest
import torch

import vstar_kernels.comfyui as vc
from vstar_kernels import BackendUnavailableError
from vstar_kernels.comfyui.patch import marked

from .comfyui_companions import (REPLACED, another_temporal_transformer, cache_node, causal_window_fix,
                                 compiled_blocks_replacing_one_attention, compiled_frames, freelong,
                                 graph_breaking_attention, guard_filtered_compile, in_time, keyword_recorder, nag,
                                 newer_attention, newer_context_windows, replace_self_attention, rifle_x, skip_block,
                                 swallowing, tar_calls, warnings_of, wrap_forwards)

COMFYUI_SRC = os.environ.get("COMFYUI_SRC")
WANVIDEOWRAPPER_SRC = os.environ.get("WANVIDEOWRAPPER_SRC")  # kijai's ComfyUI-WanVideoWrapper (its refusal)
pytestmark = pytest.mark.skipif(not COMFYUI_SRC, reason="COMFYUI_SRC does not point at a ComfyUI checkout")

NODE = vc.NODE_CLASS_MAPPINGS["VSTAR_TAR"]
ORACLE = "oracle_regularizes"
CPU = torch.device("cpu")
_TORCHVISION_SCHEMAS = []


def _torchvision_loads() -> None:
    """Make `import torchvision` work when its compiled operators cannot load (see the module docstring)."""
    if "torchvision" in sys.modules:
        return
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True, timeout=300)
    if probe.returncode == 0:
        return
    if "torchvision::nms does not exist" not in probe.stderr:
        pytest.fail(f"torchvision does not import:\n{probe.stderr[-2000:]}")
    library = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SCHEMAS.append(library)


@pytest.fixture(scope="module")
def comfy_any():
    """The ComfyUI at COMFYUI_SRC, whatever its version."""
    root = pathlib.Path(COMFYUI_SRC).resolve()
    _torchvision_loads()
    path = list(sys.path)
    saved = {name: mod for name, mod in sys.modules.items() if name == "comfy" or name.startswith("comfy.")}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.context_windows
        import comfy.ldm.cosmos.blocks
        import comfy.ldm.cosmos.predict2
        import comfy.ldm.flux.layers
        import comfy.ldm.genmo.joint_model.asymm_models_joint
        import comfy.ldm.lightricks.model
        import comfy.ldm.modules.attention
        import comfy.ldm.wan.model
        import comfy.model_management
        import comfy.model_patcher
        import comfy.model_sampling
        import comfy.ops
        import comfy.sample
        import comfy.sd
        import comfy.supported_models

        yield comfy
    finally:
        sys.path[:] = path
        for name, mod in list(sys.modules.items()):
            file = getattr(mod, "__file__", None)
            if file and pathlib.Path(file).resolve().is_relative_to(root):
                del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def comfy(comfy_any):
    """The ComfyUI at COMFYUI_SRC, when it can run the node (0.3.60 or newer)."""
    if not hasattr(comfy_any.ldm.modules.attention, "wrap_attn"):
        pytest.skip("a ComfyUI older than 0.3.60: only the node's refusal is tested")
    return comfy_any


# ---------------------------------------------------------------- models

# the scales of the q and k norms in Wan, LTX-Video, Cosmos Predict2, Mochi, HunyuanVideo, Cosmos Predict1
QK_NORMS = ("norm_q.weight", "norm_k.weight", "q_norm.weight", "k_norm.weight", "q_norm_x.weight", "k_norm_x.weight",
            "query_norm.scale", "key_norm.scale", "to_q.1.weight", "to_k.1.weight")


def _init(named, seed):
    """Random weights that make attention rows peaked (q/k norms at 2), so that TAR moves the result."""
    gen = torch.Generator().manual_seed(seed)
    values = {}
    for name, value in named:
        if name.endswith(QK_NORMS):
            values[name] = torch.full(value.shape, 2.0)
        elif value.dim() > 1:
            values[name] = torch.randn(value.shape, generator=gen) * 0.05
        elif name.endswith(("weight", "scale")):
            values[name] = 1.0 + 0.1 * torch.randn(value.shape, generator=gen)
        else:
            values[name] = 0.02 * torch.randn(value.shape, generator=gen)
    return values


def wan(comfy, seed=0, cls="WanModel", **config):
    """A tiny Wan (2 heads of 128, 2 blocks) loaded through ComfyUI's model detection, in float64."""
    config = {"dim": 256, "ffn_dim": 256, "num_heads": 2, "num_layers": 2, "text_dim": 4096, "in_dim": 16,
              "out_dim": 16, **config}
    if cls == "AnimateWanModel":       # a module that ComfyUI 0.3.59 does not have
        import comfy.ldm.wan.model_animate
    module = comfy.ldm.wan.model_animate if cls == "AnimateWanModel" else comfy.ldm.wan.model
    net = getattr(module, cls)(operations=comfy.ops.disable_weight_init, **config)
    state = _init(net.state_dict().items(), seed)
    return comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float64})


def configured(comfy, config_name, unet_config, dtype=torch.float64, seed=0):
    """A tiny model from a supported-model config of ComfyUI."""
    config = getattr(comfy.supported_models, config_name)(unet_config)
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    with torch.no_grad():
        for name, value in _init(model.diffusion_model.named_parameters(), seed).items():
            model.diffusion_model.get_parameter(name).copy_(value)
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def shift_one(comfy, model):
    """The model with flow sigmas unshifted (ComfyUI's ModelSamplingSD3 node at shift 1): percent p is sigma 1 - p."""
    import comfy_extras.nodes_model_advanced as advanced

    return advanced.ModelSamplingSD3().patch(model, 1.0)[0]


def run(comfy, model, latent, positive, negative, steps=3, cfg=4.0, sigmas=None, noise=None, **kwargs):
    if noise is None:
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent,
                               sigmas=sigmas, disable_pbar=True, seed=1, **kwargs)


def texts(dim=4096, length=7, **extra):
    gen = torch.Generator().manual_seed(3)
    return ([[torch.randn(1, length, dim, generator=gen), dict(extra)]],
            [[torch.randn(1, length, dim, generator=gen), dict(extra)]])


# ---------------------------------------------------------------- the oracle

def video_ids(frames, height, width, patch=2, before=0, after=0):
    per_frame = -(-height // patch) * -(-width // patch)
    return torch.tensor([-1] * before + [f for f in range(frames) for _ in range(per_frame)] + [-1] * after)


def _attention_call(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                    **kwargs):
    return q, k, v, heads, mask, skip_reshape, skip_output_reshape


def oracle_override(ids, sigma, strength, sigmas_in):
    """TAR by its definition (float64) on calls marked ORACLE at the steps whose sigma is in `sigmas_in` (all
    steps when None), over the whole video: `ids` (or `ids(options)`, a function of the call's
    transformer_options) for the video, -1 for the tokens after it (text); masks are additive key masks.
    Calls over fewer tokens (a part of the video) and over query slices are left plain."""
    def override(func, *args, **kwargs):
        options = kwargs["transformer_options"]
        q, k, v, heads, mask, skip_reshape, skip_output_reshape = _attention_call(*args, **kwargs)
        video = ids(options) if callable(ids) else ids
        axis = 2 if skip_reshape else 1
        if not options.get(ORACLE) or (sigmas_in is not None and float(options["sigmas"][0]) not in sigmas_in) \
                or q.shape[axis] != k.shape[axis] or q.shape[axis] < len(video):
            return func(*args, **kwargs)
        if not skip_reshape:
            q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        n = q.shape[2]
        full = torch.cat([video, torch.full((n - len(video),), -1)]).double()
        scores = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
        if mask is not None:
            keep = (mask.reshape(mask.shape[0], -1) == 0).expand(q.shape[0], n)
            scores = scores.masked_fill(~keep[:, None, None, :], -math.inf)
        fq, fk = full[:, None], full[None, :]
        band = torch.where((fq >= 0) & (fk >= 0), torch.exp(-0.5 * ((fk - fq) / sigma) ** 2), 0.0)
        row_max = scores.amax(-1, keepdim=True)
        out = (torch.softmax(scores + strength * row_max * band, dim=-1) @ v.double()).to(q.dtype)
        return out if skip_output_reshape else out.transpose(1, 2).flatten(2)
    return override


def _no_context(self, args, kwargs):
    return (args[1] if len(args) > 1 else kwargs.get("context")) is None


# where the video self-attention is, per model: (module, class, which calls of it are self-attention)
MARKS = {
    "wan": ("comfy.ldm.wan.model", "WanSelfAttention", None),
    "hunyuan": ("comfy.ldm.flux.layers", ("DoubleStreamBlock", "SingleStreamBlock"), None),
    "ltxv": ("comfy.ldm.lightricks.model", "CrossAttention", _no_context),
    "mochi": ("comfy.ldm.genmo.joint_model.asymm_models_joint", "AsymmetricAttention", None),
    "cosmos1": ("comfy.ldm.cosmos.blocks", "VideoAttn", _no_context),
    "cosmos2": ("comfy.ldm.cosmos.predict2", "Attention", _no_context),
    "svd": ("comfy.ldm.modules.attention", "CrossAttention", lambda self, args, kwargs: hasattr(self, ORACLE)),
}


@pytest.fixture
def mark(comfy, monkeypatch):
    """mark(kind): the video self-attention of that kind of model marks its transformer_options for the oracle."""
    def marking(kind):
        module, names, is_self = MARKS[kind]
        for name in (names,) if isinstance(names, str) else names:
            cls = getattr(sys.modules[module], name)
            original = cls.forward

            def forward(self, *args, _original=original, **kwargs):
                if is_self is None or is_self(self, args, kwargs):
                    kwargs["transformer_options"] = {**kwargs["transformer_options"], ORACLE: True}
                return _original(self, *args, **kwargs)
            monkeypatch.setattr(cls, "forward", forward)
    return marking


def oracle_run(comfy, model, ids, sigma, strength, latent, positive, negative, sigmas_in=None, **kwargs):
    oracle = model.clone()
    oracle.model_options["transformer_options"]["optimized_attention_override"] = oracle_override(
        ids, sigma, strength, sigmas_in)
    return run(comfy, oracle, latent, positive, negative, **kwargs)


def assert_matches(out, expected, stock, atol=1e-6):
    """The node's sample matches the oracle's (both float32 at the end of ComfyUI's sampling), and TAR moved it."""
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)
    assert (out - stock).abs().max() > 100 * atol


# ---------------------------------------------------------------- the node in ComfyUI

def test_comfyui_loads_the_installed_node(comfy, tmp_path):
    import nodes

    from vstar_kernels.comfyui.install import install

    (tmp_path / "custom_nodes").mkdir()
    package = install(str(tmp_path)).parent
    try:
        assert asyncio.run(nodes.load_custom_node(str(package)))
        assert nodes.NODE_CLASS_MAPPINGS["VSTAR_TAR"] is NODE
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS["VSTAR_TAR"] == vc.NODE_DISPLAY_NAME_MAPPINGS["VSTAR_TAR"]
    finally:
        nodes.NODE_CLASS_MAPPINGS.pop("VSTAR_TAR", None)
        nodes.NODE_DISPLAY_NAME_MAPPINGS.pop("VSTAR_TAR", None)
    required = NODE.INPUT_TYPES()["required"]
    assert list(required) == ["model", "strength", "sigma"] and NODE.RETURN_TYPES == ("MODEL",)


WAN_CASES = {
    # name: (model, latent, extra conditioning, ids)
    "t2v, odd height": (dict(), (1, 16, 4, 9, 10), {}, video_ids(4, 9, 10)),
    "i2v (CLIP image cross-attention)": (
        dict(model_type="i2v", in_dim=36), (1, 16, 3, 8, 8),
        {"clip_vision_output": (1, 257, 1280), "concat_latent_image": (1, 16, 3, 8, 8)}, video_ids(3, 8, 8)),
    "VACE blocks": (dict(cls="VaceWanModel", vace_layers=1, vace_in_dim=96), (1, 16, 3, 6, 8), {},
                    video_ids(3, 6, 8)),
    "reference image tokens first": (dict(in_dim_ref_conv=16), (1, 16, 3, 6, 8),
                                     {"reference_latents": (1, 16, 1, 6, 8)}, video_ids(3, 6, 8, before=12)),
    "HuMo reference frames last": (dict(cls="HumoWanModel"), (1, 16, 3, 6, 8),
                                   {"reference_latents": (1, 16, 2, 6, 8)}, video_ids(3, 6, 8, after=24)),
}


def _extra(spec):
    gen = torch.Generator().manual_seed(4)
    out = {}
    for name, shape in spec.items():
        value = torch.randn(shape, generator=gen)
        if name == "clip_vision_output":
            value = types.SimpleNamespace(penultimate_hidden_states=value)
        elif name == "reference_latents":
            value = [value]
        out[name] = value
    return out


@pytest.mark.parametrize("case", list(WAN_CASES))
def test_wan_matches_the_float64_oracle(comfy, mark, case):
    config, shape, extra, ids = WAN_CASES[case]
    mark("wan")
    model = wan(comfy, **config)
    positive, negative = texts(**_extra(extra))
    latent = torch.zeros(shape)
    stock = run(comfy, model, latent, positive, negative)
    (tar,) = NODE().apply(model, 1.0, 1.5)
    out = run(comfy, tar, latent, positive, negative)
    assert_matches(out, oracle_run(comfy, model, ids, 1.5, 1.0, latent, positive, negative), stock)


def test_wan22_experts_each_take_the_node(comfy, mark):
    """Two models share one sampling (high noise, then low noise, as Wan 2.2's experts): each clone has TAR."""
    mark("wan")
    high, low = wan(comfy, seed=0), wan(comfy, seed=1)
    latent = torch.zeros(1, 16, 3, 6, 6)
    positive, negative = texts()

    def stage(model, start, oracle, **kwargs):
        if oracle:
            return oracle_run(comfy, model, video_ids(3, 6, 6), 1.0, 1.0, start, positive, negative, steps=4, **kwargs)
        return run(comfy, model, start, positive, negative, steps=4, **kwargs)

    def experts(first, second, oracle=False):
        middle = stage(first, latent, oracle, last_step=2, force_full_denoise=False)
        return stage(second, middle, oracle, start_step=2, noise=torch.zeros(latent.shape))

    stock = experts(high, low)
    out = experts(NODE().apply(high, 1.0, 1.0)[0], NODE().apply(low, 1.0, 1.0)[0])
    assert_matches(out, experts(high, low, oracle=True), stock)


@pytest.mark.parametrize("start, end, steps_in", [(0.25, 0.5, (1, 2)), (0.0, 0.25, (0, 1)), (0.75, 1.0, (3,))])
def test_step_window_includes_both_ends(comfy, mark, start, end, steps_in):
    """Sigmas 1, 0.75, 0.5, 0.25 with flow shift 1, where percent p is sigma 1 - p exactly."""
    mark("wan")
    model = shift_one(comfy, wan(comfy))
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    latent = torch.zeros(1, 16, 3, 6, 8)
    positive, negative = texts()
    (tar,) = NODE().apply(model, 1.0, 1.0, start_percent=start, end_percent=end)
    out = run(comfy, tar, latent, positive, negative, sigmas=sigmas)
    inside = {float(sigmas[i]) for i in steps_in}
    expected = oracle_run(comfy, model, video_ids(3, 6, 8), 1.0, 1.0, latent, positive, negative, sigmas_in=inside,
                          sigmas=sigmas)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    fewer = oracle_run(comfy, model, video_ids(3, 6, 8), 1.0, 1.0, latent, positive, negative,
                       sigmas_in=inside - {float(sigmas[steps_in[-1]])}, sigmas=sigmas)
    assert (out - fewer).abs().max() > 1e-4


@pytest.mark.parametrize("shift, start, end, steps_in", [(1.32, 0.0, 1.0, 4), (8.06, 0.25, 0.75, 3)])
def test_a_step_on_the_windows_end_is_in_it_at_any_shift(comfy, monkeypatch, shift, start, end, steps_in):
    """ModelSamplingSD3 at shift 1.32 makes the first step's float32 sigma 1.00000012, a rounding above
    percent_to_sigma(0): the default window now regularizes it too; at shift 8.06 the steps at 0.25, 0.5 and 0.75 of
    four are in [0.25, 0.75], both ends included."""
    import comfy_extras.nodes_model_advanced as advanced

    model = advanced.ModelSamplingSD3().patch(wan(comfy), shift)[0]
    latent = torch.zeros(1, 16, 3, 4, 4)
    positive, negative = texts()
    calls = tar_calls(monkeypatch)
    run(comfy, NODE().apply(shift_one(comfy, wan(comfy)), 1.0, 1.0)[0], latent, positive, negative, steps=4)
    per_step = len(calls) // 4
    calls.clear()
    run(comfy, NODE().apply(model, 1.0, 1.0, start_percent=start, end_percent=end)[0], latent, positive, negative,
        steps=4)
    assert per_step and len(calls) == steps_in * per_step


def test_the_steps_a_percent_holds_depend_on_the_scheduler(comfy):
    """docs/comfyui.md's counts (Settings): end_percent 0.54 on 25 steps of Wan at flow shift 8, by scheduler."""
    import comfy.samplers

    from vstar_kernels.comfyui.models import WAN
    from vstar_kernels.comfyui.patch import Settings, TARPatch

    sampling = wan(comfy).get_model_object("model_sampling")
    assert float(sampling.shift) == 8.0
    patch = TARPatch(Settings(1.0, 1.0, 0.0, 0.54, 0, "auto"), WAN, {})
    counts = {scheduler: sum(patch.regularizes(torch.tensor([float(s)]), sampling)
                             for s in comfy.samplers.calculate_sigmas(sampling, scheduler, 25)[:-1])
              for scheduler in ("simple", "normal", "beta", "sgm_uniform", "ddim_uniform", "linear_quadratic",
                                "kl_optimal", "karras", "exponential")}
    assert counts == {"simple": 14, "normal": 14, "beta": 14, "sgm_uniform": 14, "ddim_uniform": 13,
                      "linear_quadratic": 17, "kl_optimal": 3, "karras": 1, "exponential": 1}


def test_the_step_window_follows_a_shift_applied_after_the_node(comfy, mark):
    """ModelSamplingSD3 after the node: the window is the shifted model's (sigmas 0.75 and 0.5 at shift 1), not the
    one of the model the node saw (Wan's shift 8, where no step of this schedule is in the window)."""
    mark("wan")
    model = wan(comfy)
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    latent = torch.zeros(1, 16, 3, 6, 8)
    positive, negative = texts()
    (tar,) = NODE().apply(model, 1.0, 1.0, start_percent=0.25, end_percent=0.5)
    out = run(comfy, shift_one(comfy, tar), latent, positive, negative, sigmas=sigmas)
    expected = oracle_run(comfy, shift_one(comfy, model), video_ids(3, 6, 8), 1.0, 1.0, latent, positive, negative,
                          sigmas_in={0.75, 0.5}, sigmas=sigmas)
    assert_matches(out, expected, run(comfy, shift_one(comfy, model), latent, positive, negative, sigmas=sigmas))


@pytest.mark.parametrize("strength, start, end, said", [
    (0.0, 0.0, 1.0, None),
    (1.0, 0.6, 0.4, "start_percent=0.6 is after end_percent=0.4: the window holds no step"),
    (1.0, 0.3, 0.45, "no model call of this sampling run (4 in all) was in the window, so TAR did not run: "
                     "start_percent=0.3 and end_percent=0.45 give sigmas from 0.7 down to 0.55, and the calls ran at "
                     "sigmas from 1 down to 0.25")])
def test_off_is_stock_bit_for_bit(comfy, caplog, strength, start, end, said):
    """Strength 0, a window that starts after it ends, a window between two steps (sigmas 0.75 and 0.5): stock,
    and but for strength 0 (the node's off switch) a warning that TAR is off."""
    model = shift_one(comfy, wan(comfy))
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    latent = torch.zeros(1, 16, 3, 6, 8)
    positive, negative = texts()
    stock = run(comfy, model, latent, positive, negative, sigmas=sigmas)
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        (tar,) = NODE().apply(model, strength, 1.0, start_percent=start, end_percent=end)
        assert torch.equal(run(comfy, tar, latent, positive, negative, sigmas=sigmas), stock)
    messages = [w.getMessage() for w in warnings_of(caplog, "VSTAR_TAR")]
    assert len(messages) == (said is not None) and all(said in m for m in messages)


def test_strength_zero_is_stock_with_the_default_schedule(comfy):
    model = wan(comfy)
    latent = torch.zeros(1, 16, 3, 5, 8)
    positive, negative = texts()
    stock = run(comfy, model, latent, positive, negative)
    assert torch.equal(run(comfy, NODE().apply(model, 0.0, 1.0)[0], latent, positive, negative), stock)


def test_clone_semantics(comfy):
    model = wan(comfy)
    before = (repr(model.model_options), dict(model.object_patches), repr(model.wrappers))
    latent = torch.zeros(1, 16, 3, 6, 8)
    positive, negative = texts()
    stock = run(comfy, model, latent, positive, negative)
    (tar,) = NODE().apply(model, 1.0, 1.0)
    assert tar is not model and tar.model is model.model
    assert (repr(model.model_options), dict(model.object_patches), repr(model.wrappers)) == before
    assert not torch.equal(run(comfy, tar, latent, positive, negative), stock)
    assert torch.equal(run(comfy, model, latent, positive, negative), stock)     # the input, after the clone ran
    assert not any(marked(block.self_attn.forward) for block in model.model.diffusion_model.blocks)


@pytest.mark.parametrize("replaced", ["diffusion_model", "diffusion_model.blocks.0.self_attn"])
def test_a_module_an_earlier_node_replaced_around_the_attention_is_refused(comfy, replaced):
    """An earlier node's object patch putting another module (other weights) in place of the self-attention, or of a
    module holding it: TAR's patch ran the module replaced in every call, and the loader's model, sampled after,
    ran the other module's forward (ComfyUI puts the patches back in the order they were made). Refused."""
    model = wan(comfy)
    other = model.clone()
    module = copy.deepcopy(model.get_model_object(replaced))
    with torch.no_grad():
        module.get_submodule("blocks.0.self_attn" if replaced == "diffusion_model" else "").o.weight.mul_(3.0)
    other.add_object_patch(replaced, module)
    with pytest.raises(ValueError, match=rf"VSTAR_TAR: an earlier node put another module in place of {replaced} "):
        NODE().apply(other, 1.0, 1.0)


@pytest.mark.parametrize("replaced", ["diffusion_model", "diffusion_model.blocks",
                                      "diffusion_model.blocks.0.self_attn"])
def test_another_branch_sampled_first_with_its_module_in_place(comfy, replaced):
    """The loader's model in two branches: one with a node putting another module in place of a self-attention (or
    of the diffusion model) sampled first, then VSTAR_TAR on the other. ComfyUI keeps the first branch's patches on
    the shared model until the next load; TAR's patch wrapped that module's forward, so the TAR branch ran the other
    module, and the loader's model afterwards too."""
    latent = torch.zeros(1, 16, 3, 4, 4)
    positive, negative = texts()
    expected = run(comfy, NODE().apply(wan(comfy), 1.0, 1.0)[0], latent, positive, negative, steps=2)
    model = wan(comfy)
    stock = run(comfy, model, latent, positive, negative, steps=2)
    other = model.clone()
    if replaced.endswith("blocks"):  # a node dropping the second block
        module = torch.nn.ModuleList([model.get_model_object(replaced)[0]])
    else:
        module = copy.deepcopy(model.get_model_object(replaced))
        with torch.no_grad():
            module.get_submodule("blocks.0.self_attn" if replaced == "diffusion_model" else "").o.weight.mul_(3.0)
    other.add_object_patch(replaced, module)
    assert not torch.equal(run(comfy, other, latent, positive, negative, steps=2), stock)
    (tar,) = NODE().apply(model, 1.0, 1.0)
    assert torch.equal(run(comfy, tar, latent, positive, negative, steps=2), expected)
    assert torch.equal(run(comfy, model, latent, positive, negative, steps=2), stock)


def test_another_branch_sampled_first_with_its_blocks_compiled(comfy):
    """The other branch compiled each block (object patches) and put its own module in place of a self-attention
    below one: the wrapper hands that assignment on to the block, and the node wrapped that module's forward."""
    latent = torch.zeros(1, 16, 3, 4, 4)
    positive, negative = texts()
    expected = run(comfy, NODE().apply(wan(comfy), 1.0, 1.0)[0], latent, positive, negative, steps=2)
    model = wan(comfy)
    run(comfy, compiled_blocks_replacing_one_attention(model), latent, positive, negative, steps=2)
    (tar,) = NODE().apply(model, 1.0, 1.0)
    assert torch.equal(run(comfy, tar, latent, positive, negative, steps=2), expected)


def test_another_branch_sampled_first_with_a_temporal_transformer_of_its_own(comfy):
    """SVD: another branch's module (another class) in place of a SpatialVideoTransformer, sampled first: VSTAR_TAR
    on the loader's model then left that transformer's temporal attention out, without a word."""
    latent = torch.zeros(6, 4, 8, 8)
    image = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    positive, negative = texts(dim=32, length=1, concat_latent_image=image)
    expected = run(comfy, NODE().apply(configured(comfy, "SVD_img2vid", SVD_UNET), 1.0, 1.0)[0], latent, positive,
                   negative, steps=2)
    model = configured(comfy, "SVD_img2vid", SVD_UNET)
    run(comfy, another_temporal_transformer(model)[0], latent, positive, negative, steps=2)
    (tar,) = NODE().apply(model, 1.0, 1.0)
    assert torch.equal(run(comfy, tar, latent, positive, negative, steps=2), expected)


def test_the_strength_is_bounded_by_the_compute_dtype(comfy):
    """The float64 model takes a strength past float32 (it was refused); set to compute in float32 by ComfyUI's
    compute-dtype call, a strength past float32 is refused at apply, naming the bound."""
    latent = torch.zeros(1, 16, 3, 4, 4)
    (tar,) = NODE().apply(wan(comfy), 1e39, 1.0)
    assert torch.isfinite(run(comfy, tar, latent, *texts(), steps=2)).all()
    model = wan(comfy)
    model.set_model_compute_dtype(torch.float32)
    with pytest.raises(ValueError, match=r"^VSTAR_TAR: strength must be finite with \|strength\| <= "
                                         r"3.4028234663852886e\+38 \(the largest float32: the math for "
                                         r"torch.float32 inputs is float32\)"):
        NODE().apply(model, 1e39, 1.0)


def recorder(calls):
    """An override such as a backend-selector node sets: records (queries, keys, sigma) and runs the stock call."""
    def override(func, *args, **kwargs):
        q, k, *_ = args
        axis = 2 if kwargs.get("skip_reshape") else 1
        calls.append((q.shape[axis], k.shape[axis], float(kwargs["transformer_options"]["sigmas"][0])))
        return func(*args, **kwargs)
    return override


@pytest.mark.parametrize("before", [True, False], ids=["override set before the node", "set after"])
def test_an_override_on_the_model_gets_every_call_not_regularized(comfy, before):
    model = shift_one(comfy, wan(comfy))
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    latent = torch.zeros(1, 16, 3, 6, 8)   # 3 frames x 12 tokens; the text has 7
    positive, negative = texts()
    window = dict(start_percent=0.25, end_percent=0.5)
    (plain,) = NODE().apply(model, 1.0, 1.0, **window)
    reference = run(comfy, plain, latent, positive, negative, sigmas=sigmas)
    calls = []
    if before:
        chained = model.clone()
        chained.model_options["transformer_options"]["optimized_attention_override"] = recorder(calls)
        (chained,) = NODE().apply(chained, 1.0, 1.0, **window)
    else:
        chained = plain.clone()
        chained.model_options["transformer_options"]["optimized_attention_override"] = recorder(calls)
    assert torch.equal(run(comfy, chained, latent, positive, negative, sigmas=sigmas), reference)
    cross = [(36, 7, float(s)) for s in sigmas[:-1] for _ in range(2)]
    own = [(36, 36, float(s)) for s in (sigmas[0], sigmas[3]) for _ in range(2)]
    assert sorted(calls) == sorted(cross + own)


# ---------------------------------------------------------------- the other models

OTHERS = {
    "hunyuan": ("HunyuanVideo", {
        "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2],
        "vec_in_dim": None, "axes_dim": [16, 56, 56], "context_in_dim": 32, "hidden_size": 256, "mlp_ratio": 2.0,
        "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "theta": 256, "qkv_bias": True,
        "guidance_embed": False, "byt5": False, "meanflow": False},
        (1, 16, 3, 6, 4), {"pooled_output": torch.zeros(1, 768)}, video_ids(3, 6, 4), torch.float64, 4.0),
    "hunyuan, padded text": (
        "HunyuanVideo", None, (1, 16, 3, 6, 4),
        {"pooled_output": torch.zeros(1, 768), "attention_mask": torch.tensor([[1] * 5 + [0] * 2])},
        video_ids(3, 6, 4), torch.float64, 1.0),
    "ltxv": ("LTXV", {
        "image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 32,
        "num_attention_heads": 2, "caption_channels": 32, "num_layers": 2},
        (1, 128, 3, 4, 5), {"attention_mask": torch.ones(1, 7, dtype=torch.long)}, video_ids(3, 4, 5, patch=1),
        torch.float64, 4.0),
    "mochi": ("GenmoMochi", {
        "image_model": "mochi_preview", "depth": 1, "patch_size": 2, "num_heads": 2, "hidden_size_x": 128,
        "hidden_size_y": 64, "mlp_ratio_x": 96.0, "mlp_ratio_y": 2.0, "learn_sigma": False, "in_channels": 12,
        "qk_norm": True, "qkv_bias": False, "out_bias": True, "attn_drop": 0.0, "patch_embed_bias": True,
        "posenc_preserve_area": True, "timestep_mlp_bias": True, "attend_to_padding": False, "timestep_scale": 1000.0,
        "use_t5": True, "t5_feat_dim": 32, "t5_token_length": 16, "rope_theta": 10000.0},
        (1, 12, 3, 6, 4), {"attention_mask": torch.tensor([[1] * 5 + [0] * 2])}, video_ids(3, 6, 4), torch.float64,
        4.0),
    "cosmos1": ("CosmosT2V", {
        "image_model": "cosmos", "max_img_h": 240, "max_img_w": 240, "max_frames": 128, "in_channels": 16,
        "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 128,
        "block_config": "FA-CA-MLP", "concat_padding_mask": True, "pos_emb_cls": "rope3d", "pos_emb_learnable": False,
        "pos_emb_interpolation": "crop", "block_x_format": "THWBD", "affline_emb_norm": True, "use_adaln_lora": True,
        "adaln_lora_dim": 32, "num_blocks": 2, "num_heads": 2, "crossattn_emb_channels": 32,
        "extra_per_block_abs_pos_emb": True, "extra_per_block_abs_pos_emb_type": "learnable",
        "rope_t_extrapolation_ratio": 2.0},
        (1, 16, 3, 4, 6), {}, video_ids(3, 4, 6), torch.float32, 4.0),   # its position embedding needs float32
    "cosmos2": ("CosmosT2IPredict2", {
        "image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240, "max_frames": 128, "in_channels": 16,
        "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 128, "concat_padding_mask": True,
        "crossattn_emb_channels": 32, "pos_emb_cls": "rope3d", "pos_emb_learnable": True,
        "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30, "use_adaln_lora": True, "adaln_lora_dim": 32,
        "num_blocks": 2, "num_heads": 2},
        (1, 16, 3, 4, 6), {}, video_ids(3, 4, 6), torch.float64, 4.0),
}


@pytest.mark.parametrize("case", list(OTHERS))
def test_other_models_match_the_oracle(comfy, mark, case):
    config_name, unet_config, shape, extra, ids, dtype, cfg = OTHERS[case]
    if unet_config is None:   # the same model, another conditioning
        unet_config = OTHERS[case.split(",")[0]][1]
    mark(case.split(",")[0].split(" ")[0])
    model = configured(comfy, config_name, unet_config, dtype)
    if case == "ltxv":
        # ComfyUI's CPU attention (sub-quadratic) does not take LTX's cross-attention mask: a backend selector
        # as users chain one, which the node must leave in place for every call it does not regularize
        attention = sys.modules["comfy.ldm.modules.attention"]
        model.model_options["transformer_options"]["optimized_attention_override"] = \
            lambda func, *args, **kwargs: attention.attention_pytorch(*args, **kwargs)
    positive, negative = texts(dim=32, **extra)
    latent = torch.zeros(shape)
    stock = run(comfy, model, latent, positive, negative, steps=2, cfg=cfg)
    (tar,) = NODE().apply(model, 1.0, 1.0)
    out = run(comfy, tar, latent, positive, negative, steps=2, cfg=cfg)
    expected = oracle_run(comfy, model, ids, 1.0, 1.0, latent, positive, negative, steps=2, cfg=cfg)
    assert_matches(out, expected, stock, atol=1e-6 if dtype == torch.float64 else 1e-4)


def test_ltx_guides_under_context_windows_that_keep_them_whole_are_refused(comfy, mark):
    """LTX-Video with keyframe guides (2 guide latent frames after 6 of video) under this ComfyUI's context windows,
    which cut the latent, guides' frames included, and keep every guide's keyframe_idxs: the model runs a window's
    last frames in the guides' places (stock samples), so the node refuses. It once took a window's last video
    frames for guides without a word (window 0-3: frames 2 and 3 never regularized), and a window of 2 frames
    was an error that named VACE's reference images."""
    mark("ltxv")
    config_name, unet_config, _, extra, _, dtype, cfg = OTHERS["ltxv"]
    model = configured(comfy, config_name, unet_config, dtype)
    attention = sys.modules["comfy.ldm.modules.attention"]
    model.model_options["transformer_options"]["optimized_attention_override"] = \
        lambda func, *args, **kwargs: attention.attention_pytorch(*args, **kwargs)
    positive, negative = texts(dim=32, keyframe_idxs=torch.zeros(1, 3, 2 * 4 * 5), **extra)
    latent = torch.zeros(1, 128, 6 + 2, 4, 5)
    for length in (4, 2):
        windowed = context_windows(comfy, model, "standard_static", length, 0)
        run(comfy, windowed, latent, positive, negative, steps=1, cfg=cfg)
        with pytest.raises(ValueError, match=r"LTX-Video: keyframe guides under context windows that do not cut"):
            run(comfy, NODE().apply(windowed, 1.0, 1.0)[0], latent, positive, negative, steps=1, cfg=cfg)


@pytest.mark.parametrize("case", ["wan", "hunyuan", "mochi"])
def test_one_frame_runs_without_tar_and_says_so(comfy, caplog, case):
    """A latent of one frame (HunyuanVideo or Mochi as a text-to-image model, whose joint attention holds the text
    too; Wan at length 1) runs without TAR, stock bit for bit, and the node says so once per run."""
    if case == "wan":
        model, (positive, negative), shape, cfg = wan(comfy), texts(), (1, 16, 1, 4, 4), 4.0
    else:
        config_name, unet_config, shape, extra, _, dtype, cfg = OTHERS[case]
        model, (positive, negative) = configured(comfy, config_name, unet_config, dtype), texts(dim=32, **extra)
        shape = shape[:2] + (1,) + shape[3:]
    latent = torch.zeros(shape)
    stock = run(comfy, model, latent, positive, negative, steps=2, cfg=cfg)
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        out = run(comfy, NODE().apply(model, 1.0, 1.0)[0], latent, positive, negative, steps=2, cfg=cfg)
    assert [w.getMessage() for w in warnings_of(caplog, "VSTAR_TAR")] == [
        "VSTAR_TAR: a model call in the window has one latent frame of video: TAR needs two frames or more, so such "
        "calls run without TAR (the stock model's output) (said once per sampling run)"]
    assert torch.equal(out, stock)


@pytest.mark.parametrize("config_name, patch", [("HunyuanImage21", [1, 2, 2]), ("HunyuanImage21Refiner", [1, 1, 1])])
def test_hunyuan_image_is_an_error(comfy, config_name, patch):
    """HunyuanImage 2.1 and its refiner (a subclass) run an image model on the HunyuanVideo class, the refiner with a
    3-D patch and a one-frame latent: refused by ComfyUI's base model, naming it an image model."""
    config = {**OTHERS["hunyuan"][1], "patch_size": patch, "in_channels": 64, "out_channels": 32}
    model = configured(comfy, config_name, config)
    assert type(model.model.diffusion_model).__name__ == "HunyuanVideo"
    with pytest.raises(ValueError, match=rf"VSTAR_TAR: the model is comfy\.model_base\.{config_name}, an image model "
                                         r"\(HunyuanImage 2\.1 .*\): TAR regularizes the frames of a video model"):
        NODE().apply(model, 1.0, 1.0)


# tiny UNets: 64 channels (ComfyUI's SVD config fixes heads of 64), one level; SVD's temporal attention is in its
# input, middle and output blocks
UNET = {"image_size": 32, "use_spatial_transformer": True, "model_channels": 64, "num_res_blocks": [1],
        "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1], "context_dim": 32}
SVD_UNET = {**UNET, "in_channels": 8, "out_channels": 4, "transformer_depth_middle": 1,
            "use_linear_in_transformer": True, "adm_in_channels": 768, "num_classes": "sequential",
            "extra_ff_mix_layer": True, "use_spatial_context": True, "merge_strategy": "learned_with_images",
            "merge_factor": 0.0, "video_kernel_size": [3, 1, 1], "use_temporal_resblock": True,
            "use_temporal_attention": True, "disable_temporal_crossattention": False}


def test_an_image_model_is_an_error(comfy):
    """SD 1.5's UNet is SVD's class without a temporal attention: refused, saying why AnimateDiff-Evolved's motion
    modules are not regularized either."""
    config = {**UNET, "in_channels": 4, "out_channels": 4, "transformer_depth_middle": -1,
              "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_resblock": False,
              "use_temporal_attention": False}
    with pytest.raises(ValueError, match="this UNet has no temporal attention .* an image model. AnimateDiff-Evolved's "
                                         "motion modules cannot be regularized: they call ComfyUI's attention without "
                                         "transformer_options"):
        NODE().apply(configured(comfy, "SD15", config), 1.0, 1.0)


@pytest.mark.skipif(not WANVIDEOWRAPPER_SRC, reason="WANVIDEOWRAPPER_SRC does not point at a ComfyUI-WanVideoWrapper "
                                                    "checkout")
def test_the_wan_video_wrappers_model_is_refused(comfy):
    """kijai's ComfyUI-WanVideoWrapper, loaded by ComfyUI's own custom-node loader, its model built as its loader
    node builds it (its WanVideoModel holding its own WanModel, in a ModelPatcher): the node cannot reach that
    model's attention (docs/comfyui.md, "Not supported, and why"), so it refuses the model, naming the wrapper,
    instead of returning a clone that would sample stock. The wrapper's requirements (ftfy, sentencepiece,
    accelerate, diffusers) must be importable."""
    import nodes

    root = pathlib.Path(WANVIDEOWRAPPER_SRC).resolve()
    mappings = dict(nodes.NODE_CLASS_MAPPINGS), dict(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    try:
        assert asyncio.run(nodes.load_custom_node(str(root)))
        loaded = {pathlib.Path(m.__file__).resolve().relative_to(root).as_posix(): m for m in list(sys.modules.values())
                  if getattr(m, "__file__", None) and pathlib.Path(m.__file__).resolve().is_relative_to(root)}
        loader, transformer = loaded["nodes.py"], loaded["wanvideo/modules/model.py"]
        cpu = torch.device("cpu")
        wrapped = loader.WanVideoModel(loader.WanVideoModelConfig(torch.float32),
                                       model_type=comfy.model_base.ModelType.FLOW, device=cpu)
        wrapped.diffusion_model = transformer.WanModel(dim=32, ffn_dim=64, freq_dim=32, text_dim=32, num_heads=2,
                                                       num_layers=1, text_len=8, main_device=cpu, offload_device=cpu)
        model = comfy.model_patcher.ModelPatcher(wrapped, cpu, cpu)
        with pytest.raises(ValueError, match=r"VSTAR_TAR: .*WanModel is ComfyUI-WanVideoWrapper's model, which the "
                                             r"node cannot reach: its sampler calls the model itself"):
            NODE().apply(model, 1.0, 1.0)
    finally:
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if file and pathlib.Path(file).resolve().is_relative_to(root):
                del sys.modules[name]
        for table, kept in zip((nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS), mappings):
            table.clear()
            table.update(kept)


@pytest.mark.parametrize("window", [False, True], ids=["whole latent", "context windows over its frames"])
def test_svd_temporal_attention_matches_the_oracle(comfy, mark, monkeypatch, window):
    """SVD's temporal attention (each spatial site's 6 frames, one token each) is regularized, the spatial one not;
    under context windows over the batch of frames (looped, some of every second frame, as newer ComfyUI runs
    them) a frame's id is its index in the latent, in time."""
    mark("svd")
    newer_context_windows(monkeypatch, comfy.context_windows)
    model = configured(comfy, "SVD_img2vid", SVD_UNET)
    temporal = [m.time_stack[j].attn1 for m in model.model.diffusion_model.modules()
                if type(m).__name__ == "SpatialVideoTransformer" for j in range(len(m.time_stack))]
    assert len(temporal) == 4
    for attention in temporal:
        setattr(attention, ORACLE, True)
    if window:
        model = context_windows(comfy, model, "looped_uniform", 3, 1, stride=2, dim=0)
    latent = torch.zeros(6, 4, 8, 8)
    image = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    positive, negative = texts(dim=32, length=1, concat_latent_image=image)
    seen = []

    def ids(options):
        if not window:
            return torch.arange(6)
        seen.append(options["context_window"].index_list)
        return torch.tensor(in_time(seen[-1], 6))
    stock = run(comfy, model, latent, positive, negative, steps=2)
    out = run(comfy, NODE().apply(model, 1.0, 1.0)[0], latent, positive, negative, steps=2)
    assert_matches(out, oracle_run(comfy, model, ids, 1.0, 1.0, latent, positive, negative, steps=2), stock)
    assert not window or any(b - a == 2 for index in seen for a, b in zip(index, index[1:]))


def test_wan_s2v_matches_the_oracle(comfy, monkeypatch):
    """Wan 2.2 S2V: the video, then the reference frame's and the motion frames' tokens, which get no bias. ComfyUI
    0.3.64 runs S2V's blocks without transformer_options, so the oracle's override goes in at the self-attention."""
    self_attention = comfy.ldm.wan.model.WanSelfAttention
    original, oracle = self_attention.forward, []

    def forward(self, *args, transformer_options, **kwargs):
        if oracle:
            transformer_options = {**transformer_options, ORACLE: True, "optimized_attention_override": oracle[0]}
        return original(self, *args, transformer_options=transformer_options, **kwargs)
    monkeypatch.setattr(self_attention, "forward", forward)
    model = wan(comfy, cls="WanModel_S2V")
    gen = torch.Generator().manual_seed(6)
    positive, negative = texts(reference_latents=[torch.randn(1, 16, 1, 8, 8, generator=gen)],
                               reference_motion=torch.randn(1, 16, 5, 8, 8, generator=gen))
    latent = torch.zeros(1, 16, 3, 8, 8)
    stock = run(comfy, model, latent, positive, negative)
    out = run(comfy, NODE().apply(model, 1.0, 1.0)[0], latent, positive, negative)
    oracle.append(oracle_override(video_ids(3, 8, 8), 1.0, 1.0, None))
    assert_matches(out, run(comfy, model, latent, positive, negative), stock)


def test_wan_animate_matches_the_oracle(comfy, mark):
    """Wan 2.2 Animate: its pose latent is added to the video's frames after the first; the leading reference frame
    (WanAnimateToVideo's trim_latent) gets no bias with reference_frames=1."""
    mark("wan")
    model = wan(comfy, cls="AnimateWanModel", num_layers=5, in_dim=36)
    gen = torch.Generator().manual_seed(7)
    positive, negative = texts(concat_latent_image=torch.randn(1, 16, 4, 6, 8, generator=gen),
                               pose_video_latent=torch.randn(1, 16, 3, 6, 8, generator=gen))
    latent = torch.zeros(1, 16, 4, 6, 8)
    stock = run(comfy, model, latent, positive, negative)
    out = run(comfy, NODE().apply(model, 1.0, 1.0, reference_frames=1)[0], latent, positive, negative)
    ids = torch.where(video_ids(4, 6, 8) == 0, -1, video_ids(4, 6, 8))
    assert_matches(out, oracle_run(comfy, model, ids, 1.0, 1.0, latent, positive, negative), stock)


class _LatentVAE:
    """Stands in for Wan's VAE where a node only encodes: random latents of Wan's shape (a frame and then one per 4)."""

    def encode(self, pixels):
        n, height, width = pixels.shape[:3]
        gen = torch.Generator().manual_seed(n)
        return torch.randn(1, 16, (n - 1) // 4 + 1, height // 8, width // 8, generator=gen)


@pytest.mark.parametrize("continue_motion", [False, True])
def test_wan_animate_needs_reference_frames(comfy, mark, continue_motion):
    """Wan 2.2 Animate with ComfyUI's WanAnimateToVideo (no reference image: it encodes a zero one; with continue
    motion, video frames of mask 1 after it): reference_frames left at 0 would regularize its reference frame as the
    video's first, so the node raises; with its trim_latent connected, that frame gets no bias."""
    import comfy_extras.nodes_wan as nodes_wan

    mark("wan")
    model = wan(comfy, cls="AnimateWanModel", num_layers=5, in_dim=36)
    motion = {"continue_motion": torch.full((5, 48, 64, 3), 0.3)} if continue_motion else {}
    positive, negative, latent, trim_latent = nodes_wan.WanAnimateToVideo.execute(
        *texts(), _LatentVAE(), 64, 48, 13, 1, 5, 0, **motion).result[:4]
    latent = latent["samples"]
    assert trim_latent == 1 and latent.shape == (1, 16, 5, 6, 8)
    with pytest.raises(ValueError, match=r"VSTAR_TAR: this Wan Animate model call's first latent frame has mask 1 in "
                                         r"its concat conditioning, .* Connect WanAnimateToVideo's trim_latent output "
                                         r"to reference_frames"):
        run(comfy, NODE().apply(model, 1.0, 1.0)[0], latent, positive, negative, steps=2)
    stock = run(comfy, model, latent, positive, negative, steps=2)
    out = run(comfy, NODE().apply(model, 1.0, 1.0, reference_frames=trim_latent)[0], latent, positive, negative,
              steps=2)
    ids = torch.where(video_ids(5, 6, 8) == 0, -1, video_ids(5, 6, 8))
    assert_matches(out, oracle_run(comfy, model, ids, 1.0, 1.0, latent, positive, negative, steps=2), stock)


def test_reference_frames_with_a_temporal_area_is_an_error(comfy, monkeypatch):
    """ConditioningSetAreaPercentageVideo over frames 2 and 3 of 4: ComfyUI runs the model on those frames alone,
    outside any context window. TAR runs there (it takes frame differences), but with reference_frames the crop's
    reference frames are not known: an error."""
    import comfy_extras.nodes_video_model as video_model

    model = wan(comfy)
    positive, negative = texts()
    (positive,) = video_model.ConditioningSetAreaPercentageVideo().append(positive, 1.0, 1.0, 0.5, 0.0, 0.0, 0.5, 1.0)
    latent = torch.zeros(1, 16, 4, 4, 4)
    calls = tar_calls(monkeypatch)
    run(comfy, NODE().apply(model, 1.0, 1.0)[0], latent, positive, negative, steps=1)
    assert {q[2] for q in calls} == {2 * 2 * 2, 4 * 2 * 2}       # the area's 2 frames, the negative's 4
    with pytest.raises(ValueError, match=r"VSTAR_TAR: reference_frames=1 are the leading frames of the whole latent, "
                                         r"but this model call runs on 2 of the 4 frames of the latent, without a "
                                         r"context window"):
        run(comfy, NODE().apply(model, 1.0, 1.0, reference_frames=1)[0], latent, positive, negative, steps=1)
    # in context windows of 4 of 8 frames, the area over frames 1-4: the first window's call holds frames 1-3 of it,
    # which were taken as its frames 0-2 (the reference mark on video frame 1)
    (positive,) = video_model.ConditioningSetAreaPercentageVideo().append(texts()[0], 1.0, 1.0, 0.5, 0.0, 0.0, 0.125,
                                                                          1.0)
    windowed = context_windows(comfy, model, "standard_static", 4, 1)
    latent = torch.zeros(1, 16, 8, 4, 4)
    with pytest.raises(ValueError, match=r"VSTAR_TAR: reference_frames=1 are the leading frames of the whole latent, "
                                         r"but this model call runs on 3 of the 4 frames of its context window"):
        run(comfy, NODE().apply(windowed, 1.0, 1.0, reference_frames=1)[0], latent, positive, negative, steps=1)


@pytest.mark.parametrize("reference_frames", [0, 1])
def test_wan_vace_reference_image_is_read_from_the_conditioning(comfy, mark, reference_frames):
    """Wan VACE: WanVaceToVideo's conditioning as it builds it with a reference image (a leading latent frame whose
    reactive half is the latent format's zero, its mask 0): that frame gets no bias, reference_frames left at 0 or
    set to its trim_latent."""
    mark("wan")
    model = wan(comfy, cls="VaceWanModel", vace_layers=1, vace_in_dim=96)
    gen = torch.Generator().manual_seed(8)
    frames = torch.randn(1, 32, 4, 6, 8, generator=gen)
    frames[:, 16:, :1] = comfy.latent_formats.Wan21().process_out(torch.zeros(1, 16, 1, 6, 8))
    mask = torch.ones(1, 64, 4, 6, 8)
    mask[:, :, :1] = 0
    positive, negative = texts(vace_frames=[frames], vace_mask=[mask], vace_strength=[1.0])
    latent = torch.zeros(1, 16, 4, 6, 8)
    stock = run(comfy, model, latent, positive, negative)
    out = run(comfy, NODE().apply(model, 1.0, 1.0, reference_frames=reference_frames)[0], latent, positive, negative)
    ids = torch.where(video_ids(4, 6, 8) == 0, -1, video_ids(4, 6, 8))
    assert_matches(out, oracle_run(comfy, model, ids, 1.0, 1.0, latent, positive, negative), stock)


# ---------------------------------------------------------------- companion nodes, newer and older ComfyUI

def test_a_comfyui_without_the_attention_override_is_refused(comfy_any, monkeypatch):
    """On ComfyUI 0.3.59 as it is; on a newer one, with its attention override taken away."""
    attention = comfy_any.ldm.modules.attention
    if hasattr(attention, "wrap_attn"):
        monkeypatch.delattr(attention, "wrap_attn")
    model = comfy_any.sd.load_diffusion_model_state_dict(
        _init(comfy_any.ldm.wan.model.WanModel(operations=comfy_any.ops.disable_weight_init, dim=256, ffn_dim=256,
                                               num_heads=2, num_layers=1, text_dim=4096, in_dim=16,
                                               out_dim=16).state_dict().items(), 0),
        model_options={"dtype": torch.float64})
    with pytest.raises(RuntimeError, match=r"VSTAR_TAR needs ComfyUI 0\.3\.60 or newer, whose attention functions hand "
                                           r"each call to .*: this ComfyUI \(0\.3\.\d+\) has no such override"):
        NODE().apply(model, 1.0, 1.0)


@pytest.mark.parametrize("weight", [0.0, 0.5], ids=["backend patch", "enhance patch"])
def test_a_later_patch_of_the_same_forward_is_refused(comfy, monkeypatch, weight):
    """Applied after the node, such a patch replaces TAR's: sampling is refused, naming it. Applied before, the
    node keeps it and TAR runs in it."""
    model = wan(comfy)
    latent = torch.zeros(1, 16, 3, 4, 4)
    positive, negative = texts()
    (tar,) = NODE().apply(model, 1.0, 1.0)
    with pytest.raises(RuntimeError, match=REPLACED):
        run(comfy, replace_self_attention(tar, weight), latent, positive, negative, steps=2)
    before = replace_self_attention(model, weight)
    calls = tar_calls(monkeypatch)
    out = run(comfy, NODE().apply(before, 1.0, 1.0)[0], latent, positive, negative, steps=2)
    assert len(calls) == 2 * 2
    assert not torch.equal(out, run(comfy, before, latent, positive, negative, steps=2))
    if weight == 0.0:
        assert torch.equal(out, run(comfy, tar, latent, positive, negative, steps=2))


def test_a_later_node_that_wraps_tars_forward_composes(comfy, monkeypatch):
    """A node after VSTAR_TAR that keeps the forward it finds on each self-attention (TAR's patch) and calls it, as
    nodes wrap a forward: TAR runs in it and the output is TAR's. It was refused as a patch replacing TAR's."""
    model = wan(comfy)
    latent = torch.zeros(1, 16, 3, 4, 4)
    positive, negative = texts()
    (tar,) = NODE().apply(model, 1.0, 1.0)
    expected = run(comfy, tar, latent, positive, negative, steps=2)
    later = wrap_forwards(tar)
    calls = tar_calls(monkeypatch)
    assert torch.equal(run(comfy, later, latent, positive, negative, steps=2), expected)
    assert len(calls) == 2 * 2


def test_a_later_patch_is_judged_by_a_call_that_ran_its_module(comfy, monkeypatch):
    """Block 1 skipped in the window's first model call (a cache's way), where a later node patched each block's
    self-attention forward: a wrapper composes (it was refused: the call ran neither TAR's module there nor the
    wrapper), a replacement is refused in the next call, which runs block 1."""
    model = wan(comfy)
    latent = torch.zeros(1, 16, 3, 4, 4)
    positive, negative = texts()
    (tar,) = NODE().apply(model, 1.0, 1.0)
    expected = run(comfy, skip_block(tar, 1, skips=1), latent, positive, negative, steps=2)
    later = wrap_forwards(tar)
    calls = tar_calls(monkeypatch)
    assert torch.equal(run(comfy, skip_block(later, 1, skips=1), latent, positive, negative, steps=2), expected)
    assert len(calls) == 2 * 2 - 1
    module = later.get_model_object("diffusion_model.blocks.1.self_attn")
    later.add_object_patch("diffusion_model.blocks.1.self_attn.forward",
                           lambda *args, **kwargs: type(module).forward(module, *args, **kwargs))
    with pytest.raises(RuntimeError, match=r"the object patch on diffusion_model\.blocks\.1\.self_attn\.forward is "
                                           r"\S+<lambda>, set by a node after VSTAR_TAR: it replaces TAR's patch"):
        run(comfy, skip_block(later, 1, skips=1), latent, positive, negative, steps=2)
    assert not any(hasattr(m, "vstar_tar_called_in") for m in model.model.modules())  # the hooks' marks are gone


@pytest.mark.parametrize("replaced", ["diffusion_model.blocks", "diffusion_model.blocks.0",
                                      "diffusion_model.blocks.0.self_attn"])
def test_a_module_a_later_node_replaced_around_the_attention_is_refused(comfy, replaced):
    """A node after VSTAR_TAR putting another module in place of a self-attention TAR patched, or of one holding it:
    the model ran that module, not the one TAR's patch is on (stock where it held every self-attention), and after
    the model's unload the loader's model kept TAR's forward (ComfyUI puts the patches back in the order they were
    made). Refused when sampling starts, naming the path, with nothing patched."""
    import comfy.model_management as model_management

    model = wan(comfy)
    latent = torch.zeros(1, 16, 3, 4, 4)
    positive, negative = texts()
    stock = run(comfy, model, latent, positive, negative, steps=2)
    (tar,) = NODE().apply(model, 1.0, 1.0)
    later = tar.clone()
    later.add_object_patch(replaced, copy.deepcopy(model.get_model_object(replaced)))
    with pytest.raises(RuntimeError, match=rf"VSTAR_TAR: a node after VSTAR_TAR put another module in place of "
                                           rf"{replaced} \(an object patch, a \S+\).*Leave that node out"):
        run(comfy, later, latent, positive, negative, steps=2)
    model_management.unload_all_models()
    assert not any(marked(vars(m).get("forward")) for m in model.model.diffusion_model.modules())
    assert torch.equal(run(comfy, model, latent, positive, negative, steps=2), stock)


def test_applying_again_through_another_nodes_patch(comfy, monkeypatch):
    """VSTAR_TAR, then a node that wraps each self-attention forward (the first node's patch inside), then VSTAR_TAR
    again: the second node's TAR runs inside the wrapper, once per call, as if the first were not there."""
    def wrapped(model):
        model = model.clone()
        for i in range(len(model.get_model_object("diffusion_model").blocks)):
            path = f"diffusion_model.blocks.{i}.self_attn.forward"

            def forward(*args, _found=model.get_model_object(path), **kwargs):
                return _found(*args, **kwargs) * 0.9
            model.add_object_patch(path, forward)
        return model
    model = wan(comfy)
    latent = torch.zeros(1, 16, 3, 4, 4)
    positive, negative = texts()
    (chain,) = NODE().apply(wrapped(NODE().apply(model, 1.0, 1.0)[0]), 2.0, 2.0)
    calls = tar_calls(monkeypatch)
    out = run(comfy, chain, latent, positive, negative, steps=2)
    assert len(calls) == 2 * 2
    assert torch.equal(out, run(comfy, NODE().apply(wrapped(model), 2.0, 2.0)[0], latent, positive, negative, steps=2))


def test_cache_nodes_that_drop_transformer_options_compose(comfy, caplog):
    """TeaCache and MagCache run Wan's blocks without transformer_options: TAR still runs in them. A call whose
    blocks a cache skips (theirs, or ComfyUI's EasyCache) regularizes nothing, and says so once per sampling run."""
    model = wan(comfy)
    latent = torch.zeros(1, 16, 3, 4, 4)
    positive, negative = texts()
    (tar,) = NODE().apply(model, 1.0, 1.0)
    expected = run(comfy, tar, latent, positive, negative)
    assert not torch.equal(expected, run(comfy, model, latent, positive, negative))
    assert torch.equal(run(comfy, cache_node(tar), latent, positive, negative), expected)
    assert torch.equal(run(comfy, NODE().apply(cache_node(model), 1.0, 1.0)[0], latent, positive, negative), expected)
    from comfy_extras.nodes_easycache import EasyCacheNode

    easy = EasyCacheNode.execute(tar, 3.0, 0.0, 1.0, False).args[0]      # ComfyUI's own: skips the model in steps
    for cached in (cache_node(tar, skip_every=2), easy):
        caplog.clear()
        with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
            run(comfy, cached, latent, positive, negative, steps=6)
        (skipped,) = warnings_of(caplog, "VSTAR_TAR")
        assert "a model call in the window ran none of the regularized self-attention modules" in skipped.getMessage()


def test_lazycaches_skipped_steps_are_said(comfy, caplog):
    """ComfyUI's LazyCache skips the model in whole steps (a noise-prediction wrapper around it), which the node
    never sees: at the run's end it counts the window's steps no model call ran at, and says so."""
    from comfy_extras.nodes_easycache import LazyCacheNode

    latent = torch.zeros(1, 16, 3, 4, 4)
    positive, negative = texts()
    (tar,) = NODE().apply(wan(comfy), 1.0, 1.0)
    lazy = LazyCacheNode.execute(tar, 3.0, 0.0, 1.0, False).args[0]
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        run(comfy, lazy, latent, positive, negative, steps=6)
    (said,) = warnings_of(caplog, "VSTAR_TAR")
    assert re.fullmatch(r"VSTAR_TAR: [1-5] of the 6 steps of this sampling run in the window ran no model call, so "
                        r"TAR did not run in them: a node skipped the model there \(LazyCache reuses an earlier "
                        r"step's result\)", said.getMessage()), said.getMessage()


def test_a_run_of_one_sigma_says_nothing(comfy, caplog):
    """Sigmas of one value (a custom sampler given no step): the run calls no model, and nothing is said of it."""
    latent = torch.zeros(1, 16, 3, 4, 4)
    positive, negative = texts()
    (tar,) = NODE().apply(wan(comfy), 1.0, 1.0)
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        run(comfy, tar, latent, positive, negative, sigmas=torch.tensor([1.0]))
    assert not warnings_of(caplog, "VSTAR_TAR")


def test_a_sampler_of_its_own_steps_is_not_said_to_skip_any(comfy, caplog):
    """dpm_adaptive calls the model at sigmas of its own, not the schedule's: which steps it skipped cannot be told,
    and nothing is said."""
    latent = torch.zeros(1, 16, 3, 4, 4)
    positive, negative = texts()
    (tar,) = NODE().apply(wan(comfy), 1.0, 1.0)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        comfy.sample.sample(tar, noise, 6, 4.0, "dpm_adaptive", "simple", positive, negative, latent,
                            disable_pbar=True, seed=1)
    assert not warnings_of(caplog, "VSTAR_TAR")


def test_freelong_windows_run_without_tar_and_say_so(comfy, mark, caplog):
    """LongLook's FreeLong runs each block again on windows of frames (tokens and rotary embedding cut): those
    calls are handed on as they came, said once per run; the blocks' passes over the whole video are regularized."""
    mark("wan")
    model = wan(comfy)
    latent = torch.zeros(1, 16, 4, 4, 6)     # 4 frames x 6 tokens
    positive, negative = texts()
    errors = []
    (tar,) = NODE().apply(model, 1.0, 1.0)
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        out = run(comfy, freelong(tar, 4, 2, errors), latent, positive, negative)
    assert errors == []
    (said,) = warnings_of(caplog, "VSTAR_TAR")
    assert "ran its self-attention over 12 tokens, but this model call's latent makes 4 frames x 6 tokens (24 " \
           "tokens): another node ran it on other tokens (LongLook's FreeLong does" in said.getMessage()
    stock = run(comfy, freelong(model, 4, 2, []), latent, positive, negative)
    expected = oracle_run(comfy, freelong(model, 4, 2, []), video_ids(4, 4, 6), 1.0, 1.0, latent, positive, negative)
    assert_matches(out, expected, stock)


@pytest.mark.parametrize("companion", ["NAG", "RifleX", "SLG"])
def test_companions_beside_the_self_attention_compose(comfy, mark, companion):
    """KJNodes' WanVideoNAG (the cross-attention's forward patched), RifleX (the rotary embedder replaced) and
    ComfyUI's SkipLayerGuidanceDiT (one more model call per step with a block skipped), applied before or after the
    node: TAR runs in the self-attention of the model they changed, in every model call that computes it."""
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT

    change = {"NAG": lambda model: nag(model, 0.5), "RifleX": lambda model: rifle_x(model, 0.5),
              "SLG": lambda model: SkipLayerGuidanceDiT.execute(model, 3.0, 0.0, 1.0, "1", "").args[0]}[companion]
    mark("wan")
    model = wan(comfy)
    latent = torch.zeros(1, 16, 3, 4, 6)
    positive, negative = texts()
    stock = run(comfy, change(model), latent, positive, negative)
    expected = oracle_run(comfy, change(model), video_ids(3, 4, 6), 1.0, 1.0, latent, positive, negative)
    assert not torch.equal(stock, run(comfy, model, latent, positive, negative))
    for tar in (change(NODE().apply(model, 1.0, 1.0)[0]), NODE().apply(change(model), 1.0, 1.0)[0]):
        assert_matches(run(comfy, tar, latent, positive, negative), expected, stock)


def test_an_error_another_node_catches_is_raised_after_the_call(comfy):
    (tar,) = NODE().apply(wan(comfy), 1.0, 1.0, backend="triton")      # float64: not a Triton kernel dtype
    with pytest.raises(BackendUnavailableError, match="float64 is not a kernel dtype"):
        run(comfy, swallowing(tar), torch.zeros(1, 16, 2, 4, 4), *texts(), steps=1)


def test_attention_keywords_the_node_does_not_know_pass(comfy, mark, monkeypatch):
    """Newer ComfyUI passes low_precision_attention=False to the override."""
    newer_attention(monkeypatch, sys.modules["comfy.ldm.wan.model"], slices=False)
    mark("wan")
    model = wan(comfy)
    latent = torch.zeros(1, 16, 3, 4, 6)
    positive, negative = texts()
    stock = run(comfy, model, latent, positive, negative)
    out = run(comfy, NODE().apply(model, 1.0, 1.0)[0], latent, positive, negative)
    assert_matches(out, oracle_run(comfy, model, video_ids(3, 4, 6), 1.0, 1.0, latent, positive, negative), stock)


def test_query_slices_are_handed_on_as_they_came(comfy, monkeypatch, caplog):
    """A self-attention computed in query slices (newer LTX guide attention): the calls go, unchanged (their
    keywords too), to the override that was there, and the node says so once per run."""
    newer_attention(monkeypatch, sys.modules["comfy.ldm.wan.model"], slices=True)
    model = wan(comfy)
    latent = torch.zeros(1, 16, 3, 4, 6)     # 3 frames x 6 tokens: slices of 9 queries
    positive, negative = texts()
    stock = run(comfy, model, latent, positive, negative)
    calls = []
    chained = model.clone()
    chained.model_options["transformer_options"]["optimized_attention_override"] = keyword_recorder(calls)
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        assert torch.equal(run(comfy, NODE().apply(chained, 1.0, 1.0)[0], latent, positive, negative), stock)
    (said,) = warnings_of(caplog, "VSTAR_TAR")
    assert "blocks.0.self_attn computed its self-attention in query slices (9 of 18 queries in a call)" \
           in said.getMessage()
    assert sorted(set(calls)) == [(9, 18, False), (18, 7, False)]


def test_a_model_built_anew_after_the_node_is_refused(comfy):
    """A node after this one that makes a new model and keeps the object patches (newer ComfyUI's
    clone(disable_dynamic=True) does): TAR's patch would run the earlier model's modules. Refused."""
    (tar,) = NODE().apply(wan(comfy), 1.0, 1.0)
    anew = tar.clone()
    anew.model = copy.deepcopy(tar.model)
    positive, negative = texts()
    with pytest.raises(RuntimeError, match=r"VSTAR_TAR: the model sampled is not the one VSTAR_TAR patched"):
        run(comfy, anew, torch.zeros(1, 16, 3, 4, 4), positive, negative, steps=1)
    run(comfy, tar.clone(), torch.zeros(1, 16, 3, 4, 4), positive, negative, steps=1)


def context_windows(comfy, model, schedule, length, overlap, stride=1, dim=2):
    """The model with ComfyUI's context windows over the latent's frames (as its WAN Context Windows node sets them;
    its Context Windows node over dim 0 for SVD)."""
    windows = comfy.context_windows
    model = model.clone()
    model.model_options["context_handler"] = windows.IndexListContextHandler(
        windows.get_matching_context_schedule(schedule), windows.get_matching_fuse_method("pyramid"),
        context_length=length, context_overlap=overlap, context_stride=stride, dim=dim)
    return model


@pytest.mark.parametrize("causal", [False, True], ids=["", "causal anchors"])
@pytest.mark.parametrize("schedule, stride, lead", [("standard_static", 1, 1), ("standard_uniform", 2, 0),
                                                    ("looped_uniform", 2, 0)],
                         ids=["windows 0-3, 3-6, 4-7 with a reference frame", "strided windows", "looped windows"])
def test_context_windows_take_the_global_frame_indices(comfy, mark, monkeypatch, schedule, stride, lead, causal):
    """In a context window, a frame's id is its index in the whole latent, in time (a looped window's frames stay
    consecutive across the latent's end), and only the window holding the whole latent's reference frames has any
    (windows of 4 of 8 latent frames; the uniform schedules with stride 2 add windows of every second frame). With
    newer ComfyUI's causal_window_fix, a window's causal anchor (the frame before it, run in front) is that frame."""
    mark("wan")
    if causal:
        causal_window_fix(monkeypatch, comfy.context_windows)
    model = context_windows(comfy, wan(comfy), schedule, 4, 1, stride)
    latent = torch.zeros(1, 16, 8, 4, 4)
    positive, negative = texts()
    seen, anchors = set(), set()

    def ids(options):
        window = options["context_window"]
        anchor = getattr(window, "causal_anchor_index", -1)
        index = ([anchor] if anchor >= 0 else []) + list(window.index_list)
        seen.add(tuple(window.index_list))
        anchors.add(anchor)
        return torch.tensor([t if i >= lead else -1 for i, t in zip(index, in_time(index, 8)) for _ in range(4)])
    stock = run(comfy, model, latent, positive, negative, steps=2)
    out = run(comfy, NODE().apply(model, 1.0, 1.0, reference_frames=lead)[0], latent, positive, negative, steps=2)
    assert_matches(out, oracle_run(comfy, model, ids, 1.0, 1.0, latent, positive, negative, steps=2), stock)
    if schedule == "standard_static":
        assert seen == {(0, 1, 2, 3), (3, 4, 5, 6), (4, 5, 6, 7)}
    else:
        assert any(b - a == 2 for index in seen for a, b in zip(index, index[1:]))
    assert any(b < a for index in seen for a, b in zip(index, index[1:])) == (schedule == "looped_uniform")
    assert any(anchor >= 0 for anchor in anchors) == causal


# ---------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("attention", ["an override that breaks the graph", "ComfyUI's CPU default", "pytorch"])
def test_torch_compile_traces_the_blocks_once(comfy, caplog, monkeypatch, attention):
    """ComfyUI's TorchCompileModel (its set_torch_compile_wrapper, backend "eager") on a model with the node, the
    attention a Sage-like override that breaks the graph (running ComfyUI's pytorch attention), ComfyUI's CPU
    default (whose memory query splits the blocks into frames of their own; how many depends on free memory) or
    its pytorch attention (the whole model one graph): the frames compiled do not grow with the blocks (dynamo's
    limit of 8 recompiles once left most blocks of 12 uncompiled), the result is TAR's, and the node sees every
    block run (one compiled code serving them all, it once recorded the first block alone and warned on every run
    that TAR had not run in the others)."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    pytorch = comfy.ldm.modules.attention.attention_pytorch
    if attention == "pytorch":
        monkeypatch.setattr(comfy.ldm.wan.model, "optimized_attention", pytorch)
    latent = torch.zeros(1, 16, 3, 4, 4)
    positive, negative = texts()
    frames = {}
    for layers in (4, 12):
        model = wan(comfy, num_layers=layers)
        breaking = attention.startswith("an override")
        if breaking:
            model = graph_breaking_attention(model, pytorch)
        (tar,) = NODE().apply(model, 1.0, 1.0)
        compiled = tar.clone()
        set_torch_compile_wrapper(compiled, backend="eager")
        with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
            out, frames[layers] = compiled_frames(lambda: run(comfy, compiled, latent, positive, negative, steps=1))
        said = [w.getMessage() for w in warnings_of(caplog, "VSTAR_TAR")]  # the breaking override's own, no other
        assert bool(said) == breaking and all("the attention override on the model" in m for m in said), said
        caplog.clear()
        assert torch.equal(out, run(comfy, tar, latent, positive, negative, steps=1))
        assert not torch.equal(out, run(comfy, model, latent, positive, negative, steps=1))
    if attention != "ComfyUI's CPU default":
        assert frames[12] <= frames[4], frames
    if attention == "pytorch":
        assert frames[4] <= 2, frames  # the model's forward and the sampler's call around it: no break per block


def test_a_compile_guard_filter_keeps_the_window(comfy):
    """KJNodes' TorchCompileModelAdvanced compiles with a guard filter that drops the guards on transformer_options;
    the node does not keep the call under way there, so a graph compiled for the steps before the window does not
    run in it: the result is the node's without compile."""
    latent = torch.zeros(1, 16, 3, 4, 4)
    positive, negative = texts()
    (tar,) = NODE().apply(wan(comfy), 1.0, 1.0, start_percent=0.5)
    out, _ = compiled_frames(lambda: run(comfy, guard_filtered_compile(tar), latent, positive, negative, steps=4))
    assert torch.equal(out, run(comfy, tar, latent, positive, negative, steps=4))


def test_a_compiled_diffusion_model_is_unwrapped(comfy):
    """A diffusion model compiled before the node (put in place by an object patch) is the model it compiled."""
    model = wan(comfy)
    latent = torch.zeros(1, 16, 3, 4, 4)
    positive, negative = texts()
    compiled = model.clone()
    compiled.add_object_patch("diffusion_model", torch.compile(model.get_model_object("diffusion_model"),
                                                               backend="eager"))
    (tar,) = NODE().apply(compiled, 1.0, 1.0)
    out, _ = compiled_frames(lambda: run(comfy, tar, latent, positive, negative, steps=1))
    assert torch.equal(out, run(comfy, NODE().apply(model, 1.0, 1.0)[0], latent, positive, negative, steps=1))
