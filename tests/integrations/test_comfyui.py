"""The ComfyUI node (vstar_kernels.comfyui) on a stand-in of ComfyUI (tests/integrations/comfyui_standin, see its
README).

A float64 oracle computes TAR densely from its definition (docs/semantics.md) with frame ids written
out here from the latent's shape, in an attention override of its own; it finds the video
self-attention by patching the toy models' classes, not through the node's mechanism. The node's
sampled latents must match it, and be stock bit for bit where TAR is off. tests/integrations/test_comfyui_real.py
runs such checks against a real ComfyUI.
"""

import copy
import importlib
import logging
import math
import pathlib
import subprocess
import sys
import types

import pytest
import torch

import vstar_kernels.comfyui as vc
from vstar_kernels import BackendUnavailableError, cli
from vstar_kernels.comfyui import models as vc_models
from vstar_kernels.comfyui.patch import Run, key_mask, marked
from vstar_kernels.frames import FrameLayout, TokenLayout

from ..helpers import ValueReads
from .comfyui_companions import (REPLACED, another_temporal_transformer, cache_node,
                                 compiled_blocks_replacing_one_attention, compiled_frames, freelong,
                                 graph_breaking_attention, guard_filtered_compile, in_time, keyword_recorder, nag,
                                 newer_attention, replace_self_attention, skip_block, swallowing, tar_calls,
                                 warnings_of, wrap_forwards)

pytestmark = pytest.mark.long  # scheduled first (tests/conftest.py)

STANDIN = pathlib.Path(__file__).resolve().parent / "comfyui_standin"
ROOT = pathlib.Path(__file__).resolve().parents[2]
NODE = vc.NODE_CLASS_MAPPINGS["VSTAR_TAR"]
ORACLE = "oracle_regularizes"
STEPS = 4


@pytest.fixture(scope="module")
def comfy():
    """The stand-in `comfy` (and `comfy_api`) package, in sys.modules for this module's tests only."""
    def standin(name):
        return name.split(".")[0] in ("comfy", "comfy_api")
    saved = {name: mod for name, mod in sys.modules.items() if standin(name)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(STANDIN))
    try:
        import comfy.context_windows
        import comfy.ldm.hunyuan_video.model
        import comfy.ldm.modules.diffusionmodules.openaimodel
        import comfy.ldm.wan.model
        import comfy.model_base
        import comfy.model_patcher
        import comfy.samplers
        import comfy_api.torch_helpers

        yield comfy
    finally:
        sys.path.remove(str(STANDIN))
        for name in [n for n in sys.modules if standin(n)]:
            del sys.modules[name]
        sys.modules.update(saved)


# ---------------------------------------------------------------- models, conditions, sampling

def wan(comfy, dtype=torch.float64, seed=0, cls="WanModel", **config):
    torch.manual_seed(seed)
    net = getattr(comfy.ldm.wan.model, cls)(**config)
    _sharpen(net)
    return comfy.model_patcher.ModelPatcher(comfy.model_base.BaseModel(net.to(dtype)))


def svd(comfy, dtype=torch.float64, seed=0, **config):
    """The toy SVD, its temporal self-attention (time_stack attn1) marked for the oracle."""
    torch.manual_seed(seed)
    net = comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel(**config)
    _sharpen(net)
    for module in net.modules():
        if type(module).__name__ == "SpatialVideoTransformer":
            for block in module.time_stack:
                setattr(block.attn1, ORACLE, True)
    return comfy.model_patcher.ModelPatcher(comfy.model_base.BaseModel(net.to(dtype)))


def hunyuan(comfy, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = comfy.ldm.hunyuan_video.model.HunyuanVideo()
    _sharpen(net)
    return comfy.model_patcher.ModelPatcher(comfy.model_base.BaseModel(net.to(dtype)))


def _sharpen(net):
    """Larger weights, so that attention rows have clear maxima and TAR's bias moves the result."""
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)


def conditions(dtype, text=7, batch_one=True, **extra):
    gen = torch.Generator().manual_seed(1)
    cond = {"c_crossattn": torch.randn(1, text, 8, generator=gen, dtype=dtype)}
    uncond = {"c_crossattn": torch.randn(1, text, 8, generator=gen, dtype=dtype)}
    for name, shape in extra.items():
        if name == "attention_mask":
            cond[name] = uncond[name] = shape
            continue
        cond[name] = torch.randn(shape, generator=gen, dtype=dtype)
        uncond[name] = torch.randn(shape, generator=gen, dtype=dtype)
    return cond, uncond


def sample(comfy, model, latent_shape, cond, uncond, dtype, steps=STEPS):
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    sigmas = comfy.samplers.schedule(model, steps)
    return comfy.samplers.sample(model, noise, sigmas, cond, uncond, cfg=3.0)


# ---------------------------------------------------------------- the oracle

def video_ids(frames, height, width, before=0, after=0, lead=0):
    """-1 * before, frames frame by frame (ceil(H/2) x ceil(W/2) tokens each, the first `lead` -1), -1 * after."""
    per_frame = -(-height // 2) * -(-width // 2)
    ids = [-1] * before + [f if f >= lead else -1 for f in range(frames) for _ in range(per_frame)] + [-1] * after
    return torch.tensor(ids)


def dense_tar(q, k, v, ids, sigma, strength, keep=None):
    """TAR by its definition, float64: (B, H, N, D) q/k/v, one id per token (-1: no bias)."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], -math.inf)
    row_max = scores.amax(-1, keepdim=True)
    fq, fk = ids[:, None].double(), ids[None, :].double()
    band = torch.where((fq >= 0) & (fk >= 0), torch.exp(-0.5 * ((fk - fq) / sigma) ** 2), 0.0)
    return torch.softmax(scores + strength * row_max * band, dim=-1) @ v


def oracle_override(ids, sigma, strength, sigmas_in):
    """An attention override that regularizes the calls marked by `mark_self_attention` at the steps whose
    sigma is in `sigmas_in` (all steps when None), over the whole video: ids of the video come first (`ids`, or
    `ids(options)`: a function of the call's transformer_options), whatever follows (text) gets -1; calls over
    fewer tokens (a part of the video) and over query slices are left plain."""
    def override(func, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False,
                 transformer_options=None, **kwargs):
        options = transformer_options
        video = ids(options) if callable(ids) else ids
        axis = 2 if skip_reshape else 1
        if not options.get(ORACLE) or (sigmas_in is not None and float(options["sigmas"][0]) not in sigmas_in) \
                or q.shape[axis] != k.shape[axis] or q.shape[axis] < len(video):
            return func(q, k, v, heads, mask=mask, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                        transformer_options=options, **kwargs)
        if not skip_reshape:
            q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        n = q.shape[2]
        full = torch.cat([video, torch.full((n - len(video),), -1)])
        keep = None if mask is None else (mask.reshape(mask.shape[0], -1) == 0).expand(q.shape[0], n)
        out = dense_tar(q, k, v, full, sigma, strength, keep).to(q.dtype)
        return out if skip_output_reshape else out.transpose(1, 2).flatten(2)
    return override


@pytest.fixture
def mark_self_attention(comfy, monkeypatch):
    """Patch the toy models' classes so their video self-attention marks its transformer_options for the oracle (the
    SVD toy's attention class: the instances with an ORACLE attribute, its temporal self-attention)."""
    def marking(cls, marked=lambda module: True):
        original = cls.forward

        def forward(self, *args, transformer_options={}, **kwargs):
            if marked(self):
                transformer_options = {**transformer_options, ORACLE: True}
            return original(self, *args, transformer_options=transformer_options, **kwargs)
        monkeypatch.setattr(cls, "forward", forward)

    marking(comfy.ldm.wan.model.WanSelfAttention)
    marking(comfy.ldm.hunyuan_video.model.DoubleStreamBlock)
    marking(comfy.ldm.hunyuan_video.model.SingleStreamBlock)
    marking(comfy.ldm.modules.diffusionmodules.openaimodel.CrossAttention, lambda module: hasattr(module, ORACLE))


def oracle_sample(comfy, model, ids, sigma, strength, steps_in, latent_shape, cond, uncond, dtype):
    sigmas = comfy.samplers.schedule(model, STEPS)
    oracle = model.clone()
    oracle.model_options["transformer_options"]["optimized_attention_override"] = oracle_override(
        ids, sigma, strength, {float(sigmas[i].to(dtype)) for i in steps_in})
    return sample(comfy, oracle, latent_shape, cond, uncond, dtype)


# ---------------------------------------------------------------- declaration, import, install

def test_node_declaration():
    types_ = NODE.INPUT_TYPES()
    required, optional = types_["required"], types_["optional"]
    assert list(required) == ["model", "strength", "sigma"]
    assert required["model"][0] == "MODEL"
    strength, sigma = required["strength"], required["sigma"]
    assert strength[0] == "FLOAT" and strength[1]["min"] <= 0.0 and strength[1]["max"] >= 1.0
    assert sigma[0] == "FLOAT" and 0.0 < sigma[1]["min"] <= 0.5 and sigma[1]["max"] >= 8.0
    for name, default in (("start_percent", 0.0), ("end_percent", 1.0)):
        kind, spec = optional[name]
        assert kind == "FLOAT" and (spec["default"], spec["min"], spec["max"]) == (default, 0.0, 1.0)
    assert NODE.RETURN_TYPES == ("MODEL",)
    assert callable(getattr(NODE(), NODE.FUNCTION)) and isinstance(NODE.CATEGORY, str)
    assert set(vc.NODE_DISPLAY_NAME_MAPPINGS) == {"VSTAR_TAR"}


def test_tooltips_say_what_the_window_and_reference_frames_are():
    """The window is ComfyUI's percent (percent_to_sigma), not a fraction of the steps; Wan Animate needs
    reference_frames."""
    optional = NODE.INPUT_TYPES()["optional"]
    for name in ("start_percent", "end_percent"):
        tooltip = optional[name][1]["tooltip"]
        assert f"percent_to_sigma({name})" in tooltip and "not a fraction of the steps" in tooltip
    assert "depends on the scheduler" in optional["end_percent"][1]["tooltip"]
    assert "Required for Wan Animate: connect WanAnimateToVideo's trim_latent" \
        in optional["reference_frames"][1]["tooltip"]


def test_imports_without_comfyui():
    """The package imports without ComfyUI; apply_tar checks its arguments, then says that it needs ComfyUI."""
    code = ("import sys; sys.modules['comfy'] = None; import vstar_kernels.comfyui as c; "
            "print(sorted(c.NODE_CLASS_MAPPINGS))\n"
            "for strength in (float('nan'), 1.0):\n"
            "    try:\n"
            "        c.apply_tar(None, strength, 1.0)\n"
            "    except Exception as exc:\n"
            "        print(type(exc).__name__, exc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "['VSTAR_TAR']"
    assert lines[1].startswith("ValueError VSTAR_TAR: strength must be a finite real number")
    assert lines[2].startswith("ImportError VSTAR_TAR: apply_tar needs ComfyUI: run it in ComfyUI's Python")


def test_install_writes_a_custom_nodes_package(tmp_path, capsys, monkeypatch):
    (tmp_path / "custom_nodes").mkdir()
    assert cli.main(["comfyui-install", str(tmp_path)]) == 0
    init = tmp_path / "custom_nodes" / "vstar_kernels_tar" / "__init__.py"
    assert str(init) in capsys.readouterr().out
    monkeypatch.syspath_prepend(str(tmp_path / "custom_nodes"))
    package = importlib.import_module("vstar_kernels_tar")
    try:
        assert package.NODE_CLASS_MAPPINGS is vc.NODE_CLASS_MAPPINGS
        assert package.NODE_DISPLAY_NAME_MAPPINGS is vc.NODE_DISPLAY_NAME_MAPPINGS
    finally:
        del sys.modules["vstar_kernels_tar"]
    assert cli.main(["comfyui-install", str(tmp_path)]) == 0    # its own package is replaced


def test_install_refuses_other_folders(tmp_path, capsys):
    assert cli.main(["comfyui-install", str(tmp_path)]) == 2
    assert "no custom_nodes/ folder" in capsys.readouterr().err
    (tmp_path / "custom_nodes" / "vstar_kernels_tar").mkdir(parents=True)
    (tmp_path / "custom_nodes" / "vstar_kernels_tar" / "__init__.py").write_text("# someone else's\n")
    assert cli.main(["comfyui-install", str(tmp_path)]) == 2
    assert "was not written by this command" in capsys.readouterr().err
    (tmp_path / "custom_nodes" / "vstar_kernels_tar" / "__init__.py").unlink()
    (tmp_path / "custom_nodes" / "vstar_kernels_tar").rmdir()
    (tmp_path / "custom_nodes" / "vstar_kernels_tar").symlink_to(tmp_path / "gone")  # a link to nothing: a traceback
    assert cli.main(["comfyui-install", str(tmp_path)]) == 2
    assert "was not written by this command" in capsys.readouterr().err
    (tmp_path / "custom_nodes" / "vstar_kernels_tar").unlink()
    (tmp_path / "custom_nodes" / "vstar_kernels_tar").mkdir()
    (tmp_path / "custom_nodes" / "vstar_kernels_tar" / "__init__.py").write_bytes(b"\xff\xfe")  # not UTF-8
    assert cli.main(["comfyui-install", str(tmp_path)]) == 2
    assert "was not written by this command" in capsys.readouterr().err  # (was the codec's error, naming no file)
    (tmp_path / "custom_nodes" / "vstar_kernels_tar" / "__init__.py").unlink()
    (tmp_path / "custom_nodes" / "vstar_kernels_tar").rmdir()
    assert cli.main(["comfyui-install", str(tmp_path)]) == 0
    capsys.readouterr()
    (tmp_path / "custom_nodes" / "vstar_kernels_tar" / "notes.txt").write_text("mine")  # ours, and a file added
    assert cli.main(["comfyui-install", str(tmp_path)]) == 2  # (it said: not written by this command)
    assert "was written by this command but now holds other files too (notes.txt)" in capsys.readouterr().err


def test_install_into_a_folder_it_cannot_write_says_so(tmp_path, capsys, monkeypatch):
    """A ComfyUI of another user's, or read-only: a traceback before (the command caught ValueError alone)."""
    (tmp_path / "custom_nodes").mkdir()

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
    assert cli.main(["comfyui-install", str(tmp_path)]) == 2
    init = tmp_path / "custom_nodes" / "vstar_kernels_tar" / "__init__.py"
    assert capsys.readouterr().err.strip() == f"comfyui-install: cannot write {init}: Permission denied"
    from vstar_kernels.comfyui.install import install
    with pytest.raises(PermissionError, match="cannot write") as raised:  # the class it wraps, for a caller
        install(str(tmp_path))
    assert raised.value.errno == 13


# ---------------------------------------------------------------- numerics against the oracle

WAN_CASES = {
    # name: (model config, latent shape, extra conditions, ids of the video self-attention)
    "t2v, odd height": ({}, (1, 4, 5, 7, 10), {}, video_ids(5, 7, 10)),
    "i2v": ({"image_to_video": True, "in_dim": 8}, (1, 4, 4, 6, 6),
            {"clip_fea": (1, 3, 6), "c_concat": (1, 4, 4, 6, 6)}, video_ids(4, 6, 6)),
    "reference image first": ({"in_dim_ref_conv": 4}, (1, 4, 3, 6, 8), {"reference_latent": (1, 4, 6, 8)},
                              video_ids(3, 6, 8, before=12)),
    "extra frames in time": ({}, (1, 4, 3, 5, 6), {"time_dim_concat": (1, 4, 2, 5, 6)},
                             video_ids(3, 5, 6, after=2 * 9)),
}


@pytest.mark.parametrize("case", list(WAN_CASES))
def test_wan_matches_the_float64_oracle(comfy, mark_self_attention, case):
    config, shape, extra, ids = WAN_CASES[case]
    dtype = torch.float64
    model = wan(comfy, dtype, **config)
    cond, uncond = conditions(dtype, **extra)
    stock = sample(comfy, model, shape, cond, uncond, dtype)
    (tar,) = NODE().apply(model, 1.0, 1.5, backend="reference")
    out = sample(comfy, tar, shape, cond, uncond, dtype)
    expected = oracle_sample(comfy, model, ids, 1.5, 1.0, range(STEPS), shape, cond, uncond, dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert (out - stock).abs().max() > 1e-3       # TAR changes the result, far beyond the tolerance


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_float32_model_matches_the_oracle(comfy, mark_self_attention, backend):
    """Kernel (Triton interpreter on CPU) or reference in float32 against the float64 formula on the same model."""
    dtype = torch.float32
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 5, 6)
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0, backend=backend)
    out = sample(comfy, tar, shape, cond, uncond, dtype, steps=STEPS)
    expected = oracle_sample(comfy, model, video_ids(3, 5, 6), 1.0, 1.0, range(STEPS), shape, cond, uncond, dtype)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_each_model_call_speculates_by_the_last_calls_flag_rate(comfy, mark_self_attention, monkeypatch):
    """The Triton kernels' speculative forward under a sampling run: every regularized attention call gets the
    run's speculate= and flags=, and past Speculation.BREAK_EVEN the next model call runs two passes."""
    import vstar_kernels as vk
    from vstar_kernels.comfyui import patch

    seen = []
    real = patch.tar_attention

    def spy(*args, **kwargs):
        seen.append((kwargs["speculate"], kwargs["flags"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(patch, "tar_attention", spy)
    monkeypatch.setattr(vk.Speculation, "BREAK_EVEN", -1.0)  # any rate is above it
    dtype = torch.float32
    model = wan(comfy, dtype)
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0, backend="triton")
    sample(comfy, tar, (1, 4, 3, 5, 6), cond, uncond, dtype, steps=2)
    flags = {id(f) for _, f in seen}
    assert seen[0][0] is True and not seen[-1][0] and len(flags) == 1  # one run, one counter


def test_text_as_long_as_the_video(comfy, mark_self_attention):
    """Self- and cross-attention are told apart by where the call comes from, not by lengths: 4 frames x 4
    video tokens and 16 text tokens."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 4, 4, 4)
    cond, uncond = conditions(dtype, text=16)
    (tar,) = NODE().apply(model, 2.0, 0.7, backend="reference")
    out = sample(comfy, tar, shape, cond, uncond, dtype)
    expected = oracle_sample(comfy, model, video_ids(4, 4, 4), 0.7, 2.0, range(STEPS), shape, cond, uncond, dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_joint_attention_with_a_text_mask(comfy, mark_self_attention):
    """HunyuanVideo's layout: video then text in one attention, padded text masked; the text gets frame -1."""
    dtype = torch.float64
    model = hunyuan(comfy, dtype)
    shape = (1, 4, 3, 6, 5)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    cond, uncond = conditions(dtype, text=6, attention_mask=mask)
    stock = sample(comfy, model, shape, cond, uncond, dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0, backend="reference")
    out = sample(comfy, tar, shape, cond, uncond, dtype)
    expected = oracle_sample(comfy, model, video_ids(3, 6, 5), 1.0, 1.0, range(STEPS), shape, cond, uncond, dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert (out - stock).abs().max() > 1e-3


def test_reference_frames_lead_the_latent(comfy, mark_self_attention):
    """reference_frames=1 (WanVaceToVideo's trim_latent): the first latent frame gets frame -1."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 4, 6, 6)
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0, reference_frames=1, backend="reference")
    out = sample(comfy, tar, shape, cond, uncond, dtype)
    expected = oracle_sample(comfy, model, video_ids(4, 6, 6, lead=1), 1.0, 1.0, range(STEPS), shape, cond, uncond,
                             dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def vace_context(dtype, frames, references, inputs=1):
    """A Wan VACE condition (1, inputs, 16 + 16 + 64 channels, frames, 6, 6) as WanVaceToVideo makes it and the
    model's latent_in leaves it: its first `references` frames are reference images (0 past the first 16 channels)."""
    context = torch.randn(1, inputs, 96, frames, 6, 6, generator=torch.Generator().manual_seed(5), dtype=dtype)
    context[:, :, 16:, :references] = 0
    return context


@pytest.mark.parametrize("references, reference_frames", [(1, 0), (2, 2), (0, 0)],
                         ids=["read", "agreeing", "none"])
def test_wan_vace_reference_images_are_read_from_the_conditioning(comfy, mark_self_attention, references,
                                                                   reference_frames):
    """WanVaceToVideo's reference images (leading latent frames, their control's reactive half and mask 0) get
    frame -1 with reference_frames left at 0, as with it set to trim_latent."""
    dtype = torch.float64
    model = wan(comfy, dtype, cls="VaceWanModel")
    shape = (1, 4, 4, 6, 6)
    cond, uncond = conditions(dtype)
    cond["vace_context"] = uncond["vace_context"] = vace_context(dtype, 4, references)
    (tar,) = NODE().apply(model, 1.0, 1.0, reference_frames=reference_frames, backend="reference")
    out = sample(comfy, tar, shape, cond, uncond, dtype)
    expected = oracle_sample(comfy, model, video_ids(4, 6, 6, lead=references), 1.0, 1.0, range(STEPS), shape, cond,
                             uncond, dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_wan_vace_reference_frames_must_agree_with_the_conditioning(comfy):
    dtype = torch.float64
    model = wan(comfy, dtype, cls="VaceWanModel")
    cond, uncond = conditions(dtype)
    cond["vace_context"] = uncond["vace_context"] = vace_context(dtype, 4, 1)
    (tar,) = NODE().apply(model, 1.0, 1.0, reference_frames=2, backend="reference")
    with pytest.raises(ValueError, match=r"reference_frames=2 makes 2 of this call's latent frames \[0, 1, 2, 3\] "
                                         r"reference images, but its VACE conditioning marks 1"):
        sample(comfy, tar, (1, 4, 4, 6, 6), cond, uncond, dtype)
    cond["vace_context"] = uncond["vace_context"] = torch.cat([vace_context(dtype, 4, 1), vace_context(dtype, 4, 2)],
                                                              dim=1)
    (tar,) = NODE().apply(model, 1.0, 1.0, backend="reference")
    with pytest.raises(ValueError, match=r"VSTAR_TAR: TAR takes one frame layout per call, but its sequences \(or "
                                         r"VACE inputs\) lead with different numbers of reference images, "
                                         r"\[1, 2, 1, 2\]"):
        sample(comfy, tar, (1, 4, 4, 6, 6), cond, uncond, dtype)


def test_wan_s2v_matches_the_oracle(comfy, monkeypatch):
    """Wan S2V: the video, then the reference and motion frames' tokens (no bias), its blocks run without
    transformer_options (ComfyUI 0.3.64), so the oracle's override goes in at the self-attention."""
    self_attention = comfy.ldm.wan.model.WanSelfAttention
    original, oracle = self_attention.forward, []

    def forward(self, *args, transformer_options={}, **kwargs):
        if oracle:
            transformer_options = {**transformer_options, ORACLE: True, "optimized_attention_override": oracle[0]}
        return original(self, *args, transformer_options=transformer_options, **kwargs)
    monkeypatch.setattr(self_attention, "forward", forward)
    dtype = torch.float64
    model = wan(comfy, dtype, cls="WanModel_S2V")
    shape = (1, 4, 3, 4, 6)
    cond, uncond = conditions(dtype, reference_latent=(1, 4, 1, 4, 6), reference_motion=(1, 4, 2, 4, 6))
    stock = sample(comfy, model, shape, cond, uncond, dtype)
    out = sample(comfy, NODE().apply(model, 1.0, 1.0, backend="reference")[0], shape, cond, uncond, dtype)
    oracle.append(oracle_override(video_ids(3, 4, 6), 1.0, 1.0, None))
    torch.testing.assert_close(out, sample(comfy, model, shape, cond, uncond, dtype), rtol=0, atol=1e-10)
    assert (out - stock).abs().max() > 1e-3


@pytest.mark.parametrize("windows", [None, [[0, 1, 2, 3], [2, 3, 4, 5]], [[0, 2, 4], [1, 3, 5]]],
                         ids=["whole latent", "context windows", "strided windows"])
def test_svd_temporal_attention_matches_the_oracle(comfy, mark_self_attention, windows):
    """SVD: the temporal self-attention (each spatial site's 6 frames, one token each: frame ids 0..5) is
    regularized, the spatial and the cross-attention not; under context windows (over the batch of frames, dim 0)
    a frame's id is its index in the latent."""
    dtype = torch.float64
    model = svd(comfy, dtype)
    if windows:
        model.model_options["context_handler"] = comfy.context_windows.FixedContextHandler(windows, dim=0)
    shape = (6, 4, 3, 4)
    cond, uncond = conditions(dtype, text=5)
    cond["num_video_frames"] = uncond["num_video_frames"] = 6
    stock = sample(comfy, model, shape, cond, uncond, dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0, backend="reference")
    out = sample(comfy, tar, shape, cond, uncond, dtype)

    def ids(options):
        return torch.tensor(options["context_window"].index_list if windows else range(6))
    expected = oracle_sample(comfy, model, ids, 1.0, 1.0, range(STEPS), shape, cond, uncond, dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert (out - stock).abs().max() > 1e-3


# ---------------------------------------------------------------- steps, stock identity, clones, chaining

@pytest.mark.parametrize("start, end, steps_in", [(0.25, 0.5, [1, 2]), (0.0, 0.25, [0, 1]), (0.5, 1.0, [2, 3])])
def test_step_window_includes_both_ends(comfy, mark_self_attention, start, end, steps_in):
    """Step i of 4 has sigma percent_to_sigma(i / 4): windows whose ends are step sigmas include those steps."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 4, 4)
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0, start_percent=start, end_percent=end, backend="reference")
    out = sample(comfy, tar, shape, cond, uncond, dtype)
    expected = oracle_sample(comfy, model, video_ids(3, 4, 4), 1.0, 1.0, steps_in, shape, cond, uncond, dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    fewer = oracle_sample(comfy, model, video_ids(3, 4, 4), 1.0, 1.0, steps_in[1:], shape, cond, uncond, dtype)
    assert (out - fewer).abs().max() > 1e-6


def test_a_step_on_the_windows_end_is_in_it_whatever_its_rounding(comfy, monkeypatch):
    """At shift 1.32 the float32 sigmas of steps 1 and 2 of 4 lie a rounding above percent_to_sigma(0.25) and
    below percent_to_sigma(0.5): both ends being included, the window [0.25, 0.5] regularizes both steps (it took
    neither), and the default window every step."""
    dtype = torch.float32
    model = shifted(comfy, wan(comfy, dtype), 1.32)
    sampling = model.get_model_object("model_sampling")
    sigmas = [float(torch.tensor(sampling.percent_to_sigma(p), dtype=dtype)) for p in (0.25, 0.5)]
    assert sigmas[0] > sampling.percent_to_sigma(0.25) and sigmas[1] < sampling.percent_to_sigma(0.5)
    shape = (1, 4, 3, 4, 4)
    cond, uncond = conditions(dtype)
    calls = tar_calls(monkeypatch)
    sample(comfy, NODE().apply(model, 1.0, 1.0)[0], shape, cond, uncond, dtype)
    per_step = len(calls) / STEPS
    assert per_step > 0
    calls.clear()
    sample(comfy, NODE().apply(model, 1.0, 1.0, start_percent=0.25, end_percent=0.5)[0], shape, cond, uncond, dtype)
    assert len(calls) == 2 * per_step


def test_a_second_node_says_that_it_replaces_the_first(comfy, caplog):
    """The node applied to a model that has TAR replaces it (one node holds every setting): it says so, naming the
    settings it replaces (each of them), also at strength 0, which leaves the model without TAR."""
    dtype = torch.float64
    (first,) = NODE().apply(wan(comfy, dtype), 1.5, 2.0, start_percent=0.0, end_percent=0.5, reference_frames=1,
                            backend="reference")
    for strength, how in ((1.0, "with its own settings"), (0.0, "with none (strength 0)")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
            NODE().apply(first, strength, 1.0, start_percent=0.5, end_percent=1.0)
        (said,) = warnings_of(caplog, "VSTAR_TAR")
        assert said.getMessage() == ("VSTAR_TAR: the model already had TAR from an earlier VSTAR_TAR node "
                                     "(strength=1.5, sigma=2, start_percent=0, end_percent=0.5, reference_frames=1, "
                                     f"backend=reference); this node replaces it {how}. One node holds every setting: "
                                     "to keep the earlier TAR, leave this node out")


def shifted(comfy, model, shift):
    """The model with ComfyUI's ModelSamplingSD3 applied (an object patch on model_sampling)."""
    model = model.clone()
    model.add_object_patch("model_sampling", comfy.model_sampling.ModelSamplingDiscreteFlow(shift))
    return model


def test_the_step_window_follows_a_shift_applied_after_the_node(comfy, mark_self_attention):
    """A shift node after the node moves the schedule: the window is the shifted model's (resolved when the model
    runs), steps 1 and 2 of 4 at shift 1; with the sigmas of the model the node saw (shift 8), no step."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 4, 4)
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0, start_percent=0.25, end_percent=0.5, backend="reference")
    out = sample(comfy, shifted(comfy, tar, 1.0), shape, cond, uncond, dtype)
    expected = oracle_sample(comfy, shifted(comfy, model, 1.0), video_ids(3, 4, 4), 1.0, 1.0, [1, 2], shape, cond,
                             uncond, dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strength, start, end, said", [
    (0.0, 0.0, 1.0, None),  # strength 0 is the node's off switch: nothing to say
    (0.0, 0.6, 0.4, None),  # nor of its window
    (1.0, 0.6, 0.4, "start_percent=0.6 is after end_percent=0.4: the window holds no step, so the model runs "
                    "without TAR"),
    (1.0, 0.3, 0.35, "no model call of this sampling run ({STEPS} in all) was in the window, so TAR did not run: "
                     "start_percent=0.3 and end_percent=0.35 give sigmas from {high:g} down to {low:g}, and the calls "
                     "ran at sigmas from {first:g} down to {last:g}. Widen the window, or move it to these steps")])
def test_off_is_stock_bit_for_bit(comfy, caplog, dtype, strength, start, end, said):
    """Strength 0, a window that starts after it ends, and a window between two steps (0.25 and 0.5): the model's
    output bit for bit; but for strength 0, a warning says that TAR is off (when the node is applied, or after a
    sampling run none of whose steps was in the window)."""
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 5, 6)
    cond, uncond = conditions(dtype)
    stock = sample(comfy, model, shape, cond, uncond, dtype)
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        (tar,) = NODE().apply(model, strength, 1.0, start_percent=start, end_percent=end)
        assert torch.equal(sample(comfy, tar, shape, cond, uncond, dtype), stock)
    sampling, schedule = model.get_model_object("model_sampling"), comfy.samplers.schedule(model, STEPS)
    said = said and said.format(STEPS=STEPS, high=float(sampling.percent_to_sigma(start)),
                                low=float(sampling.percent_to_sigma(end)), first=float(schedule[0]),
                                last=float(schedule[-2]))  # cond and uncond in one call a step; none at sigma 0
    assert [w.getMessage() for w in warnings_of(caplog, "VSTAR_TAR")] == ([f"VSTAR_TAR: {said}"] if said else [])
    if strength == 0.0 or start > end:   # nothing is added at all
        assert tar.object_patches == {} and tar.wrappers == model.wrappers


def test_a_run_with_a_step_in_the_window_says_nothing_of_it(comfy, caplog):
    """The window's warning is the run's, not the call's: a run whose first steps are outside the window but one
    step is in says nothing; a run (a second sampler, its steps after the window) none of whose steps is says so."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 4, 4)
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0, start_percent=0.7, end_percent=0.8)
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        sample(comfy, tar, shape, cond, uncond, dtype)
    assert not warnings_of(caplog, "VSTAR_TAR")
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        comfy.samplers.sample(tar, noise, comfy.samplers.schedule(tar, STEPS)[:2], cond, uncond, cfg=3.0)
    (said,) = warnings_of(caplog, "VSTAR_TAR")
    assert "no model call of this sampling run (1 in all) was in the window" in said.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):  # a run of no step: no model call, no word
        comfy.samplers.sample(tar, noise, comfy.samplers.schedule(tar, STEPS)[-1:], cond, uncond, cfg=3.0)
    assert not warnings_of(caplog, "VSTAR_TAR")


def test_clone_semantics(comfy):
    dtype = torch.float64
    model = wan(comfy, dtype)
    model.model_options["transformer_options"]["custom"] = {"kept": [1]}
    options, patches, wrappers = repr(model.model_options), dict(model.object_patches), repr(model.wrappers)
    shape = (1, 4, 3, 4, 6)
    cond, uncond = conditions(dtype)
    stock = sample(comfy, model, shape, cond, uncond, dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0)
    assert tar is not model and tar.model is model.model
    assert (repr(model.model_options), model.object_patches, repr(model.wrappers)) == (options, patches, wrappers)
    assert not torch.equal(sample(comfy, tar, shape, cond, uncond, dtype), stock)
    assert torch.equal(sample(comfy, model, shape, cond, uncond, dtype), stock)   # the input, after the clone ran
    for block in model.model.diffusion_model.blocks:
        assert marked(block.self_attn.forward) is None
    assert len(tar.object_patches) == 2 and all(marked(p) for p in tar.object_patches.values())


def recorder(calls):
    """An override already on the model (as a backend selector sets one): records each call's (q length,
    k length, sigma) and runs the stock attention."""
    def override(func, *args, **kwargs):
        q, k = args[0], args[1]
        axis = 2 if kwargs.get("skip_reshape") else 1
        calls.append((q.shape[axis], k.shape[axis], float(kwargs["transformer_options"]["sigmas"][0])))
        return func(*args, **kwargs)
    return override


@pytest.mark.parametrize("before, compiled", [(True, False), (False, False), (True, True)],
                         ids=["override set before the node", "set after", "set before, compiled"])
def test_an_earlier_override_gets_every_call_not_regularized(comfy, before, compiled, caplog):
    """And the node says, once per run, that it does not run in the regularized calls (an override that changes
    what attention means, a sparse one, is then off there), naming it also where the model is compiled."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 4, 6)          # 3 frames x 6 tokens; text of 7 tokens
    cond, uncond = conditions(dtype)
    (plain,) = NODE().apply(model, 1.0, 1.0, start_percent=0.25, end_percent=0.5)
    reference = sample(comfy, plain, shape, cond, uncond, dtype)
    calls = []
    if before:
        chained = model.clone()
        chained.model_options["transformer_options"]["optimized_attention_override"] = recorder(calls)
        (chained,) = NODE().apply(chained, 1.0, 1.0, start_percent=0.25, end_percent=0.5)
    else:
        chained = plain.clone()
        chained.model_options["transformer_options"]["optimized_attention_override"] = recorder(calls)
    if compiled:
        from comfy_api.torch_helpers import set_torch_compile_wrapper
        set_torch_compile_wrapper(chained, backend="eager")
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        assert torch.equal(sample(comfy, chained, shape, cond, uncond, dtype), reference)
    assert [w.getMessage() for w in warnings_of(caplog, "VSTAR_TAR")] == [
        f"VSTAR_TAR: the attention override on the model ({__name__}.recorder.<locals>.override) does not run in the "
        "regularized self-attention calls, which TAR computes with its own kernel; it runs in every other attention "
        "call (said once per sampling run)"]
    sigmas = [float(s) for s in comfy.samplers.schedule(model, STEPS)[:-1]]
    cross = sorted((18, 7, s) for s in sigmas for _ in range(2))         # 2 blocks
    own = sorted((18, 18, s) for s in (sigmas[0], sigmas[3]) for _ in range(2))   # steps 0 and 3 only
    assert sorted(calls) == sorted(cross + own)


@pytest.mark.parametrize("earlier", [None, "forward"])
def test_a_model_built_anew_after_the_node_is_refused(comfy, earlier):
    """A node after this one that clones onto a new model with the object patches kept (newer ComfyUI's
    clone(disable_dynamic=True)): TAR's patches would call the earlier model's modules, their weights (a LoRA
    patched on the new one lost). Refused when sampling starts, also where TAR wraps an earlier node's patch of the
    forward; the model itself, sampled again with the patches of its last run still in place, runs."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    if earlier == "forward":
        model = replace_self_attention(model, 0.5)
    (tar,) = NODE().apply(model, 1.0, 1.0)
    anew = tar.clone()  # the clone's options, object patches and wrappers, on a copy of the model
    anew.model = copy.deepcopy(tar.model)
    cond, uncond = conditions(dtype)
    with pytest.raises(RuntimeError, match=r"VSTAR_TAR: the model sampled is not the one VSTAR_TAR patched: it was "
                                           r"built anew .* apply VSTAR_TAR after that node. With dynamic VRAM on, "
                                           r".* --disable-dynamic-vram"):
        sample(comfy, anew, (1, 4, 3, 4, 4), cond, uncond, dtype)
    first = sample(comfy, tar, (1, 4, 3, 4, 4), cond, uncond, dtype)
    tar.patch_model()  # the last run's object patches left in place, as ComfyUI leaves a loaded model's
    assert torch.equal(sample(comfy, tar.clone(), (1, 4, 3, 4, 4), cond, uncond, dtype), first)
    tar.unpatch_model()


@pytest.mark.parametrize("replaced", ["diffusion_model", "diffusion_model.blocks.1",
                                      "diffusion_model.blocks.1.self_attn"])
def test_a_module_an_earlier_node_replaced_around_the_attention_is_refused(comfy, replaced):
    """An earlier node's object patch that puts another module in place of one holding a regularized self-attention
    (or of the self-attention itself): TAR's patch of its forward wrapped the module replaced, so the model ran
    without that node's module in every call, and ComfyUI, putting the patches back in order, left the replacing
    module's forward on the loader's model. Refused, naming the path, unless strength is 0 (nothing is patched); a
    torch.compile wrapper of the same model (ComfyUI's older TorchCompileModel) is no other module."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    original = model.get_model_object(replaced)
    other = model.clone()
    other.add_object_patch(replaced, copy.deepcopy(original))
    with pytest.raises(ValueError, match=rf"VSTAR_TAR: an earlier node put another module in place of {replaced} "
                                         rf"\(an object patch, a \S+\.{type(original).__name__}\).*TAR cannot "
                                         r"patch the self-attention's forward"):
        NODE().apply(other, 1.0, 1.0)
    (off,) = NODE().apply(other, 0.0, 1.0)      # strength 0, the node's off switch, adds nothing: not refused
    assert off.object_patches == other.object_patches and not off.wrappers
    compiled = model.clone()
    compiled.add_object_patch("diffusion_model", torch.compile(model.get_model_object("diffusion_model")))
    NODE().apply(compiled, 1.0, 1.0)
    other.patch_model()  # the same check on a model loaded with the object patches in force
    with pytest.raises(ValueError, match=rf"in place of {replaced}"):
        NODE().apply(other, 1.0, 1.0)
    other.unpatch_model()


@pytest.mark.parametrize("replaced", ["diffusion_model.blocks", "diffusion_model.blocks.1",
                                      "diffusion_model.blocks.1.self_attn",
                                      "diffusion_model.blocks.1.self_attn.forward"])
def test_another_branch_loaded_with_its_module_in_place(comfy, replaced):
    """Another branch of the graph (the loader's model cloned, another module or forward put in place of one on a
    self-attention's path; a block list without its second block) sampled first, its object patches left on the
    shared model as ComfyUI leaves a loaded model's: VSTAR_TAR applied to the loader's model then wrapped that
    branch's module's forward, or patched the blocks of its list only, without a word."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 4, 4)
    cond, uncond = conditions(dtype)
    expected = sample(comfy, NODE().apply(model, 1.0, 1.0)[0], shape, cond, uncond, dtype)
    other = model.clone()
    found = model.get_model_object(replaced)
    if replaced.endswith(".forward"):
        other.add_object_patch(replaced, lambda *args, **kwargs: found(*args, **kwargs) * 3.0)
    elif replaced.endswith("blocks"):
        other.add_object_patch(replaced, torch.nn.ModuleList([found[0]]))  # a block-dropping node
    else:
        module = copy.deepcopy(found)
        with torch.no_grad():
            module.get_submodule("self_attn" if replaced.endswith("1") else "").o.weight.mul_(3.0)
        other.add_object_patch(replaced, module)
    other.patch_model()
    (tar,) = NODE().apply(model, 1.0, 1.0)
    other.unpatch_model()
    assert torch.equal(sample(comfy, tar, shape, cond, uncond, dtype), expected)


@pytest.mark.parametrize("case", ["diffusion model compiled, a block dropped", "blocks compiled, one replaced"])
def test_another_branch_loaded_with_compiled_modules(comfy, case):
    """The other branch compiled the diffusion model (or each block) by object patches and patched below the
    wrapper, which hands the assignment on to the module it wraps: the node read the leftover below it (a
    shortened block list: an AttributeError; a module in place of a self-attention: TAR wrapped it)."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 4, 4)
    cond, uncond = conditions(dtype)
    expected = sample(comfy, NODE().apply(model, 1.0, 1.0)[0], shape, cond, uncond, dtype)
    dm = model.get_model_object("diffusion_model")
    if case.startswith("diffusion model"):
        other = model.clone()
        other.add_object_patch("diffusion_model", torch.compile(dm, backend="eager"))
        other.add_object_patch("diffusion_model.blocks", torch.nn.ModuleList([dm.blocks[0]]))
    else:
        other = compiled_blocks_replacing_one_attention(model)
    other.patch_model()
    (tar,) = NODE().apply(model, 1.0, 1.0)
    other.unpatch_model()
    assert torch.equal(sample(comfy, tar, shape, cond, uncond, dtype), expected)


def test_a_temporal_transformer_compiled_by_this_branch_keeps_its_paths(comfy):
    """SVD with one SpatialVideoTransformer compiled by an object patch of this branch: the node patches through
    the wrapper at the module's own paths (they were its ``_orig_mod`` paths)."""
    model = svd(comfy)
    found = set(NODE().apply(model, 1.0, 1.0)[0].object_patches)
    path = next(name for name, module in model.get_model_object("diffusion_model").named_modules()
                if type(module).__name__ == "SpatialVideoTransformer")
    compiled = model.clone()
    compiled.add_object_patch(f"diffusion_model.{path}",
                              torch.compile(model.get_model_object(f"diffusion_model.{path}"), backend="eager"))
    (tar,) = NODE().apply(compiled, 1.0, 1.0)
    assert set(tar.object_patches) == found | {f"diffusion_model.{path}"}


def test_another_branch_loaded_with_a_temporal_transformer_of_its_own(comfy):
    """SVD: another branch's module in place of a SpatialVideoTransformer (another class: the node's targets go by
    the class's name) loaded: VSTAR_TAR on the loader's model left that transformer's temporal attention out."""
    model = svd(comfy)
    found = NODE().apply(model, 1.0, 1.0)[0].object_patches.keys()
    other, path = another_temporal_transformer(model)
    other.patch_model()
    (tar,) = NODE().apply(model, 1.0, 1.0)
    other.unpatch_model()
    assert tar.object_patches.keys() == found and any(key.startswith(f"diffusion_model.{path}.") for key in found)


def test_a_compiled_attention_stays_compiled_with_another_branch_loaded(comfy):
    """This branch puts a torch.compile wrapper in place of a self-attention; another, loaded, patched that
    module's forward: TAR's patch on the wrapper called the module's own forward, not the wrapper's (compile
    skipped without a word)."""
    key = "diffusion_model.blocks.0.self_attn"
    model = wan(comfy)
    module = model.get_model_object(key)
    compiled = model.clone()
    wrapper = torch.compile(module, backend="eager")
    compiled.add_object_patch(key, wrapper)
    other = model.clone()
    other.add_object_patch(f"{key}.forward", lambda *args, **kwargs: module.forward(*args, **kwargs))
    other.patch_model()
    (tar,) = NODE().apply(compiled, 1.0, 1.0)
    other.unpatch_model()
    assert tar.object_patches[f"{key}.forward"].__self__.original is vars(wrapper)["forward"]


def test_applying_again_replaces_the_settings(comfy):
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 4, 6)
    cond, uncond = conditions(dtype)
    (once,) = NODE().apply(model, 0.5, 2.0)
    (first,) = NODE().apply(model, 1.0, 1.0)
    (twice,) = NODE().apply(first, 0.5, 2.0)
    expected = sample(comfy, once, shape, cond, uncond, dtype)
    assert torch.equal(sample(comfy, twice, shape, cond, uncond, dtype), expected)
    (off,) = NODE().apply(first, 0.0, 1.0)
    assert off.object_patches == {} and off.get_wrappers("apply_model", "vstar_tar") == []
    assert torch.equal(sample(comfy, off, shape, cond, uncond, dtype), sample(comfy, model, shape, cond, uncond, dtype))


def test_an_object_patch_already_there_keeps_running(comfy):
    """The node's patch calls a forward another node object-patched before it; applied again, it puts it back."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    seen = []
    path = "diffusion_model.blocks.0.self_attn.forward"
    original = model.get_model_object(path)

    def spy(*args, **kwargs):
        seen.append(kwargs["transformer_options"].get("optimized_attention_override"))
        return original(*args, **kwargs)
    model.add_object_patch(path, spy)
    (tar,) = NODE().apply(model, 1.0, 1.0)
    sample(comfy, tar, (1, 4, 2, 4, 4), *conditions(dtype), dtype)
    assert len(seen) == STEPS and all(s is vc.patch.tar_override for s in seen)
    (off,) = NODE().apply(tar, 0.0, 1.0)
    assert off.object_patches == {path: spy}


def wrap_self_attention(model, scale):
    """A node that object-patches each block's self-attention forward with one that calls the forward it finds."""
    model = model.clone()
    for i in range(len(model.get_model_object("diffusion_model").blocks)):
        path = f"diffusion_model.blocks.{i}.self_attn.forward"

        def forward(*args, _found=model.get_model_object(path), **kwargs):
            return _found(*args, **kwargs) * scale
        model.add_object_patch(path, forward)
    return model


def test_applying_again_through_another_nodes_patch(comfy, monkeypatch):
    """VSTAR_TAR, then a node that wraps the same self-attention forward (the first node's patch inside), then
    VSTAR_TAR again: the second node's TAR runs inside the wrapper, once per call, as if the first were not there."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 4, 4)
    cond, uncond = conditions(dtype)
    (chain,) = NODE().apply(wrap_self_attention(NODE().apply(model, 1.0, 1.0)[0], 0.9), 2.0, 2.0)
    calls = tar_calls(monkeypatch)
    out = sample(comfy, chain, shape, cond, uncond, dtype)
    assert len(calls) == STEPS * len(model.get_model_object("diffusion_model").blocks)
    expected = sample(comfy, NODE().apply(wrap_self_attention(model, 0.9), 2.0, 2.0)[0], shape, cond, uncond, dtype)
    assert torch.equal(out, expected)


# ---------------------------------------------------------------- errors

def test_unknown_model_is_an_error(comfy):
    model = comfy.model_patcher.ModelPatcher(comfy.model_base.BaseModel(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"torch.nn.modules.linear.Linear is not a video model the node knows; "
                                         r"it supports Wan \(comfy\.ldm\.wan\.model\.WanModel\)"):
        NODE().apply(model, 1.0, 1.0)


def test_the_wan_video_wrappers_model_is_named_as_such():
    """Its class is WanModel too: "WanModel is not a model the node knows; it supports ... WanModel" said nothing."""
    wrapped = type("WanModel", (torch.nn.Module,), {"__module__": "ComfyUI-WanVideoWrapper.wanvideo.modules.model"})
    with pytest.raises(ValueError, match=r"VSTAR_TAR: ComfyUI-WanVideoWrapper\.wanvideo\.modules\.model\.WanModel is "
                                         r"ComfyUI-WanVideoWrapper's model, which the node cannot reach: .* Load Wan "
                                         r"with ComfyUI's own nodes"):
        vc_models.family_of(wrapped())


@pytest.mark.parametrize("base", ["HunyuanImage21", "HunyuanImage21Refiner"])
def test_hunyuan_image_is_an_error(comfy, base):
    """HunyuanImage 2.1 (and its refiner, a subclass) runs an image model on the HunyuanVideo class: refused by its
    ComfyUI base model, naming it an image model."""
    net = comfy.ldm.hunyuan_video.model.HunyuanVideo()
    model = comfy.model_patcher.ModelPatcher(getattr(comfy.model_base, base)(net))
    with pytest.raises(ValueError, match=rf"VSTAR_TAR: the model is comfy\.model_base\.{base}, an image model "
                                         r"\(HunyuanImage 2\.1 .*\): TAR regularizes the frames of a video model"):
        NODE().apply(model, 1.0, 1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma=0.0), "^VSTAR_TAR: sigma must be > 0"),
    (dict(strength=math.nan), "strength must be a finite real"),
    (dict(start_percent=1.5), r"start_percent must be in \[0, 1\]"),
    (dict(end_percent=-0.1), r"end_percent must be in \[0, 1\]"),
    (dict(reference_frames=-1), "reference_frames must be a non-negative int"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_inputs_name_the_argument(comfy, kwargs, match):
    args = {"strength": 1.0, "sigma": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        NODE().apply(wan(comfy), **args)


def test_the_strength_is_bounded_by_the_models_compute_dtype(comfy):
    """A strength the model's compute dtype cannot hold is refused at apply, not at the first call mid-sampling;
    the bound named, printed to its last digit, is taken; a float64 model takes a strength past float32 (it was
    refused at float32's bound, which the message printed rounded up, itself refused)."""
    bound = torch.finfo(torch.float32).max
    for model in (wan(comfy, torch.float32), wan(comfy).clone()):
        if model.model.get_dtype() == torch.float64:
            model.add_object_patch("manual_cast_dtype", torch.float32)  # ComfyUI's compute-dtype node
        with pytest.raises(ValueError, match=r"^VSTAR_TAR: strength must be finite with \|strength\| <= "
                                             r"3.4028234663852886e\+38 \(the largest float32.*\), got -1e\+39"):
            NODE().apply(model, -1e39, 1.0)
        NODE().apply(model, -bound, 1.0)
    dtype = torch.float64
    (tar,) = NODE().apply(wan(comfy, dtype), 1e300, 1.0)
    assert torch.isfinite(sample(comfy, tar, (1, 4, 3, 4, 4), *conditions(dtype), dtype)).all()


def test_a_model_that_is_not_a_model_patcher_is_named(comfy):
    """(Once an AttributeError on `get_model_object`.)"""
    with pytest.raises(TypeError, match=r"VSTAR_TAR: model must be a ComfyUI MODEL \(a ModelPatcher\), got "
                                        r"WanModel"):
        NODE().apply(wan(comfy).model.diffusion_model, 1.0, 1.0)


def test_attention_outside_the_override_is_an_error(comfy, monkeypatch):
    """A self-attention that does not go through ComfyUI's attention functions cannot be regularized: error."""
    def own_attention(self, x, transformer_options={}):
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        return self.o(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
    monkeypatch.setattr(comfy.ldm.wan.model.WanSelfAttention, "forward", own_attention)
    (tar,) = NODE().apply(wan(comfy), 1.0, 1.0)
    with pytest.raises(RuntimeError, match="blocks.0.self_attn computed its attention without ComfyUI's attention "
                                           "override"):
        sample(comfy, tar, (1, 4, 2, 4, 4), *conditions(torch.float64), torch.float64)


def test_an_earlier_patch_computing_the_attention_itself_is_named(comfy):
    """An earlier node's patch of the self-attention forward that computes the attention without ComfyUI's functions:
    the error names that patch and says what to change (it said only that TAR could not run)."""
    model = wan(comfy).clone()
    for i in range(2):
        attention = model.get_model_object(f"diffusion_model.blocks.{i}.self_attn")

        def own_attention(x, transformer_options={}, _self=attention, **kwargs):
            q, k, v = (t.unflatten(-1, (_self.num_heads, -1)).transpose(1, 2) for t in (_self.q(x), _self.k(x),
                                                                                          _self.v(x)))
            return _self.o(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        model.add_object_patch(f"diffusion_model.blocks.{i}.self_attn.forward", own_attention)
    (tar,) = NODE().apply(model, 1.0, 1.0)
    with pytest.raises(RuntimeError, match=r"so TAR could not run there: a node computes it itself \(an earlier "
                                           r"node's patch of this forward \(.*own_attention\), .*\)\. Leave that "
                                           r"node out, or use one that sets the override"):
        sample(comfy, tar, (1, 4, 2, 4, 4), *conditions(torch.float64), torch.float64)


def test_too_many_reference_frames_is_an_error(comfy):
    (tar,) = NODE().apply(wan(comfy), 1.0, 1.0, reference_frames=2)
    with pytest.raises(ValueError, match=r"reference_frames=2 leaves none of this call's latent frames \[0, 1\] as "
                                         r"video"):
        sample(comfy, tar, (1, 4, 2, 4, 4), *conditions(torch.float64), torch.float64)


@pytest.mark.parametrize("masked, reference_frames, error", [
    (1, 0, True),       # WanAnimateToVideo's reference frame first, reference_frames left at 0
    (1, 1, False),      # its trim_latent connected
    (3, 1, False),      # continue-motion frames after the reference have mask 1 too: video
    (0, 0, False),      # a first frame of mask 0 (not WanAnimateToVideo's conditioning)
])
def test_wan_animate_needs_reference_frames_for_its_reference(comfy, monkeypatch, masked, reference_frames, error):
    """Wan Animate: WanAnimateToVideo puts its reference image first, with mask 1 in c_concat's 4 leading channels:
    with reference_frames at 0 that frame would be regularized as video, so the node raises instead."""
    import comfy.ldm.wan.model_animate

    dtype = torch.float64
    torch.manual_seed(0)
    net = comfy.ldm.wan.model_animate.AnimateWanModel(in_dim=4 + 8)     # the latent, then c_concat: mask and image
    _sharpen(net)
    model = comfy.model_patcher.ModelPatcher(comfy.model_base.BaseModel(net.to(dtype)))
    cond, uncond = conditions(dtype, c_concat=(1, 8, 4, 4, 4))
    for c in (cond, uncond):
        c["c_concat"][:, :4] = 0.0
        c["c_concat"][:, :4, :masked] = 1.0
    (tar,) = NODE().apply(model, 1.0, 1.0, reference_frames=reference_frames)
    if error:
        with pytest.raises(ValueError, match=r"VSTAR_TAR: this Wan Animate model call's first latent frame has mask 1 "
                                             r"in its concat conditioning, .* but reference_frames is 0.* Connect "
                                             r"WanAnimateToVideo's trim_latent output to reference_frames"):
            sample(comfy, tar, (1, 4, 4, 4, 4), cond, uncond, dtype)
    else:
        calls = tar_calls(monkeypatch)
        sample(comfy, tar, (1, 4, 4, 4, 4), cond, uncond, dtype)
        assert calls


def test_reference_frames_with_a_temporal_crop_is_an_error(comfy, monkeypatch):
    """A model call on some of the latent's frames outside a context window (an area conditioning over time crops
    the latent so): TAR takes frame differences, so it runs on the crop's frames numbered from 0; but the crop's
    place in the latent, and so its reference frames, are not known: an error with reference_frames."""
    dtype = torch.float64
    model = wan(comfy, dtype).clone()

    def crop(apply_model, args):        # frames 2 and 3 of 4, as ConditioningSetAreaPercentageVideo's area runs them
        out = torch.zeros_like(args["input"])
        out[:, :, 2:] = apply_model(args["input"][:, :, 2:], args["timestep"], **args["c"])
        return out
    model.set_model_unet_function_wrapper(crop)
    cond, uncond = conditions(dtype)
    calls = tar_calls(monkeypatch)
    sample(comfy, NODE().apply(model, 1.0, 1.0)[0], (1, 4, 4, 4, 4), cond, uncond, dtype)
    assert calls and all(q[2] == 2 * 2 * 2 for q in calls)      # the crop's 2 frames of 2 x 2 tokens
    (tar,) = NODE().apply(model, 1.0, 1.0, reference_frames=1)
    with pytest.raises(ValueError, match=r"VSTAR_TAR: reference_frames=1 are the leading frames of the whole latent, "
                                         r"but this model call runs on 2 of the 4 frames of the latent, without a "
                                         r"context window \(a temporal crop: .*ConditioningSetAreaPercentageVideo.*\)"
                                         r".* Take the temporal area off the conditioning; or, unless the references "
                                         r"are WanAnimateToVideo's \(refused at 0\), set reference_frames to 0"):
        sample(comfy, tar, (1, 4, 4, 4, 4), cond, uncond, dtype)


@pytest.mark.parametrize("reference_frames", [0, 1])
def test_reference_frames_with_a_temporal_crop_in_a_context_window_is_an_error(comfy, reference_frames):
    """The crop inside a window: the call holds frames of the window from the crop's start, which the ids took as
    the window's first ones (the reference mark on a video frame). With reference_frames an error; without, the
    crop's frames numbered from the window's first (TAR takes frame differences)."""
    settings = vc.patch.Settings(1.0, 1.0, 0.0, 1.0, reference_frames=reference_frames, backend="auto")
    wrapper = vc.patch.TARPatch(settings, vc_models.WAN, {})
    window = comfy.context_windows.IndexListContextWindow([0, 1, 2, 3], dim=2)
    run = vc.patch.Run((1, 4, 8, 4, 4))
    assert wrapper.frame_ids(TokenLayout(4, 4), {"context_window": window}, run, frames=4)[1:] == (1, 2, 3)
    if not reference_frames:
        assert wrapper.frame_ids(TokenLayout(3, 4), {"context_window": window}, run, frames=3) == (0, 1, 2)
        return
    with pytest.raises(ValueError, match=r"reference_frames=1 are the leading frames of the whole latent, but this "
                                         r"model call runs on 3 of the 4 frames of its context window \(a temporal "
                                         r"crop"):
        wrapper.frame_ids(TokenLayout(3, 4), {"context_window": window}, run, frames=3)


def test_a_call_mixing_steps_inside_and_outside_the_window_is_an_error():
    settings = vc.patch.Settings(1.0, 1.0, start_percent=0.25, end_percent=0.75, reference_frames=0, backend="auto")
    wrapper = vc.patch.TARPatch(settings, vc_models.WAN, {})
    flow = types.SimpleNamespace(percent_to_sigma=lambda percent: 1.0 - percent)
    assert wrapper.regularizes(torch.tensor([0.75, 0.75]), flow) and wrapper.regularizes(torch.tensor([0.25]), flow)
    assert not wrapper.regularizes(torch.tensor([0.875, 0.875]), flow)
    with pytest.raises(ValueError, match=r"one model call mixes sigmas inside and outside the window \[0.25, 0.75\]"):
        wrapper.regularizes(torch.tensor([0.5, 0.875]), flow)


def test_key_masks():
    keys = 5
    additive = torch.tensor([[0.0, 0.0, -torch.finfo(torch.float16).max, 0.0, -math.inf]], dtype=torch.float16)
    keep = torch.tensor([[True, True, False, True, False]])
    assert torch.equal(key_mask(additive, 2, keys, "m"), keep.expand(2, keys))
    assert torch.equal(key_mask(additive[:, None], 2, keys, "m"), keep.expand(2, keys))     # (1, 1, N)
    per_batch = torch.tensor([[True] * keys, [False, True, True, True, True]])
    assert torch.equal(key_mask(per_batch[:, None, None], 2, keys, "m"), per_batch)           # bool, (B, 1, 1, N)
    assert key_mask(None, 2, keys, "m") is None
    with pytest.raises(ValueError, match="m: an additive mask with entries other than 0 and -inf"):
        key_mask(torch.tensor([[0.0, -1.0, 0.0, 0.0, 0.0]]), 2, keys, "m")
    with pytest.raises(ValueError, match=r"m: TAR takes masks over keys only, of shape \(B or 1, 1, 1, 5\)"):
        key_mask(torch.zeros(2, 3, keys), 2, keys, "m")              # one row per query
    with pytest.raises(ValueError, match=r"got a mask of shape \(2, 5\)"):
        key_mask(per_batch, 2, keys, "m")                             # 2-D is (queries, keys) in ComfyUI
    with pytest.raises(ValueError, match="m: a torch.int64 attention mask"):
        key_mask(torch.zeros(1, keys, dtype=torch.long), 2, keys, "m")


# ---------------------------------------------------------------- token layouts of the other models

def fake(module, name, **attributes):
    """An object whose class has the module and name of a ComfyUI diffusion model."""
    cls = type(name, (), {"__module__": module})
    obj = cls()
    for key, value in attributes.items():
        setattr(obj, key, value)
    return obj


def test_layouts_of_the_other_models(comfy):
    x = torch.zeros(1, 4, 5, 7, 9)
    humo = fake("comfy.ldm.wan.model", "HumoWanModel", patch_size=(1, 2, 2), ref_conv=None, blocks=[0, 1])
    layout = vc_models.family_of(humo).layout(humo, x, {"reference_latent": torch.zeros(1, 4, 2, 7, 9)})
    assert layout == TokenLayout(5, 20, after=2 * 12)      # padded video; unpadded reference frames last
    # newer ComfyUI's in-context references: after the video (and Phantom's frames), padded, in WanModel's own
    # forward only (VACE's has one of its own)
    wan_ = fake("comfy.ldm.wan.model", "WanModel", patch_size=(1, 2, 2), ref_conv=None)
    references = {"context_latents": [torch.zeros(1, 4, 2, 7, 9), torch.zeros(1, 4, 1, 3, 3)],
                  "time_dim_concat": torch.zeros(1, 4, 1, 7, 9)}
    assert vc_models.family_of(wan_).layout(wan_, x, references) == TokenLayout(5, 20, after=20 + 2 * 20 + 4)
    compiled = fake("torch._dynamo.eval_frame", "OptimizedModule", _orig_mod=wan_, patch_size=(1, 2, 2), ref_conv=None)
    assert vc_models.WAN.layout(compiled, x, references) == TokenLayout(5, 20, after=20 + 2 * 20 + 4)
    vace = type("VaceWanModel", (type(wan_),), {"__module__": "comfy.ldm.wan.model", "forward_orig": print})()
    vace.patch_size, vace.ref_conv = (1, 2, 2), None
    assert vc_models.family_of(vace).layout(vace, x, references) == TokenLayout(5, 20, after=20)
    hunyuan_ = fake("comfy.ldm.hunyuan_video.model", "HunyuanVideo", patch_size=[1, 2, 2])
    layout = vc_models.family_of(hunyuan_).layout(hunyuan_, x, {"ref_latent": torch.zeros(1, 4, 1, 7, 9)})
    assert layout == TokenLayout(5, 20, before=20, text_after=True)
    image = fake("comfy.ldm.hunyuan_video.model", "HunyuanVideo", patch_size=[2, 2])
    with pytest.raises(ValueError, match="an image model, not a video model"):
        vc_models.family_of(image).layout(image, x, {})
    ltx = fake("comfy.ldm.lightricks.model", "LTXVModel")
    assert vc_models.family_of(ltx).layout(ltx, x, {"keyframe_idxs": torch.zeros(1, 3, 2 * 63)}) == \
        TokenLayout(3, 63, after=126)
    with pytest.raises(ValueError, match="10 keyframe guide tokens are not whole frames of 63 tokens"):
        vc_models.family_of(ltx).layout(ltx, x, {"keyframe_idxs": torch.zeros(1, 3, 10)})
    # newer ComfyUI: (batch, 3, guide tokens, 2), and the guide tokens of a negative denoise_mask dropped
    newer = {"keyframe_idxs": torch.zeros(1, 3, 2 * 63, 2)}
    assert vc_models.family_of(ltx).layout(ltx, x, newer) == TokenLayout(3, 63, after=126)
    mask = torch.ones(2, 1, 5, 7, 9)
    mask[0, :, 4, :3] = -1                                   # 27 tokens of the second guide frame dropped
    assert vc_models.family_of(ltx).layout(ltx, x, {**newer, "denoise_mask": mask}) == \
        TokenLayout(3, 63, after=126 - 27)
    mask[0, :, 2, 0, 0] = -1
    with pytest.raises(ValueError, match="LTX-Video: this call's denoise_mask drops video tokens"):
        vc_models.family_of(ltx).layout(ltx, x, {**newer, "denoise_mask": mask})
    # guides in a context window: newer ComfyUI's cut them to the window's (it has guide_frames_indices);
    # 0.3.64's keep them all while the model runs the window's last frames in their places: refused
    windowed = comfy.context_windows.IndexListContextWindow([4, 5, 6], dim=2)
    with pytest.raises(ValueError, match=r"LTX-Video: keyframe guides under context windows that do not cut"):
        vc_models.family_of(ltx).layout(ltx, x, {**newer, "transformer_options": {"context_window": windowed}})
    over_batch = comfy.context_windows.IndexListContextWindow([1], dim=0)   # each call keeps its frames and guides
    assert vc_models.family_of(ltx).layout(ltx, x, {**newer, "transformer_options": {
        "context_window": over_batch}}) == TokenLayout(3, 63, after=126)
    windowed.guide_frames_indices = [0, 1]
    assert vc_models.family_of(ltx).layout(ltx, x, {**newer, "transformer_options": {
        "context_window": windowed}}) == TokenLayout(3, 63, after=126)
    with pytest.raises(ValueError, match=r"LTX-Video: 5 keyframe guide frames of this call's 5 latent frames leave"):
        vc_models.family_of(ltx).layout(ltx, x, {"keyframe_idxs": torch.zeros(1, 3, 5 * 63)})
    s2v = fake("comfy.ldm.wan.model", "WanModel_S2V", patch_size=(1, 2, 2))
    layout = vc_models.family_of(s2v).layout(s2v, x, {"reference_latent": torch.zeros(1, 4, 1, 7, 9)})
    assert layout == TokenLayout(5, 20, text_after=True, tail="the reference and motion tokens")
    assert layout.describe() == "5 frames x 20 tokens, then the reference and motion tokens"
    mochi = fake("comfy.ldm.genmo.joint_model.asymm_models_joint", "AsymmDiTJoint", patch_size=2)
    assert vc_models.family_of(mochi).layout(mochi, x, {}) == TokenLayout(5, 20, text_after=True)
    for module, name in (("comfy.ldm.cosmos.model", "GeneralDIT"), ("comfy.ldm.cosmos.predict2", "MiniTrainDIT")):
        cosmos = fake(module, name, patch_temporal=1, patch_spatial=2)
        assert vc_models.family_of(cosmos).layout(cosmos, torch.zeros(1, 4, 6, 8, 10), {}) == \
            TokenLayout(6, 20)
    with pytest.raises(ValueError, match=r"expected a 5-D video latent .* got shape \(1, 4, 8, 8\)"):
        vc_models.family_of(mochi).layout(mochi, torch.zeros(1, 4, 8, 8), {})


def test_targets_of_the_other_models():
    """Each family's targets, from the diffusion model's modules by path (as the node reads them)."""
    def targets(module, name, modules):
        return vc_models.family_of(fake(module, name)).targets(modules)

    def listing(n):
        return [types.SimpleNamespace() for _ in range(n)]
    assert targets("comfy.ldm.wan.model", "VaceWanModel", {"blocks": listing(2), "vace_blocks": listing(1)}) == \
        ["vace_blocks.0.self_attn", "blocks.0.self_attn", "blocks.1.self_attn"]
    assert targets("comfy.ldm.hunyuan_video.model", "HunyuanVideo", {"double_blocks": listing(1),
                                                                     "single_blocks": listing(2)}) == \
        ["double_blocks.0", "single_blocks.0", "single_blocks.1"]
    assert targets("comfy.ldm.lightricks.model", "LTXVModel", {"transformer_blocks": listing(1)}) == \
        ["transformer_blocks.0.attn1"]
    assert targets("comfy.ldm.genmo.joint_model.asymm_models_joint", "AsymmDiTJoint", {"blocks": listing(1)}) == \
        ["blocks.0.attn"]
    cosmos1 = {"blocks": {"block0": None, "block1": None}}
    for block in ("block0", "block1"):
        cosmos1[f"blocks.{block}.blocks"] = listing(3)
        cosmos1.update({f"blocks.{block}.blocks.{i}": types.SimpleNamespace(block_type=t)
                        for i, t in enumerate(("ca", "fa", "mlp"))})
    assert targets("comfy.ldm.cosmos.model", "GeneralDIT", cosmos1) == ["blocks.block0.blocks.1.block",
                                                                        "blocks.block1.blocks.1.block"]
    assert targets("comfy.ldm.cosmos.predict2", "MiniTrainDIT", {"blocks": listing(1)}) == ["blocks.0.self_attn"]
    for module, name in (("comfy.ldm.wan.model", "WanModel_S2V"), ("comfy.ldm.wan.model_animate", "AnimateWanModel")):
        assert targets(module, name, {"blocks": listing(2)}) == ["blocks.0.self_attn", "blocks.1.self_attn"]
    with pytest.raises(ValueError, match="this UNet has no temporal attention .* an image model. AnimateDiff-Evolved's "
                                         "motion modules cannot be regularized"):
        targets("comfy.ldm.modules.diffusionmodules.openaimodel", "UNetModel", {"": None})


def test_svd_targets_and_layout(comfy):
    """The temporal self-attention of each SpatialVideoTransformer, one token per frame; SD's UNet (the same
    class, no temporal attention) is refused."""
    unet = comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel
    family = vc_models.family_of(unet())
    assert family.targets(dict(unet().named_modules())) == ["input_blocks.0.time_stack.0.attn1",
                                                            "middle_block.0.time_stack.0.attn1"]
    assert family.layout(unet(), torch.zeros(2 * 6, 4, 3, 4), {"num_video_frames": 6}) == \
        TokenLayout(6, 1)
    with pytest.raises(ValueError, match=r"expected a latent of \(batch x num_video_frames, channels, height, width\), "
                                         r"got shape \(10, 4, 3, 4\) with num_video_frames=6"):
        family.layout(unet(), torch.zeros(10, 4, 3, 4), {"num_video_frames": 6})
    with pytest.raises(ValueError, match="this UNet has no temporal attention"):
        NODE().apply(comfy.model_patcher.ModelPatcher(comfy.model_base.BaseModel(unet(temporal=False))), 1.0, 1.0)


# ---------------------------------------------------------------- companion nodes, newer and older ComfyUI

@pytest.mark.parametrize("weight", [0.0, 0.5], ids=["backend patch", "enhance patch"])
def test_a_later_patch_of_the_same_forward_is_refused(comfy, monkeypatch, weight):
    """Applied after the node, such a patch replaces TAR's: sampling is refused, naming it. Applied before, the
    node keeps it and TAR runs in it."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 4, 4)
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0)
    with pytest.raises(RuntimeError, match=REPLACED):
        sample(comfy, replace_self_attention(tar, weight), shape, cond, uncond, dtype)
    before = replace_self_attention(model, weight)
    calls = tar_calls(monkeypatch)
    out = sample(comfy, NODE().apply(before, 1.0, 1.0)[0], shape, cond, uncond, dtype)
    assert len(calls) == 2 * STEPS
    assert not torch.equal(out, sample(comfy, before, shape, cond, uncond, dtype))
    if weight == 0.0:
        assert torch.equal(out, sample(comfy, tar, shape, cond, uncond, dtype))


def wan_with_tar(comfy):
    """A float64 Wan model, its clone with VSTAR_TAR (1, 1), and run(model): a sample of a 3-frame latent."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0)
    return model, tar, lambda patched: sample(comfy, patched, (1, 4, 3, 4, 4), cond, uncond, dtype)


@pytest.mark.parametrize("blocks", [[0], [0, 1]])
def test_a_later_node_that_wraps_tars_forward_composes(comfy, monkeypatch, blocks):
    """A node after VSTAR_TAR that keeps the forward it finds on a self-attention (TAR's patch) and calls it composes:
    TAR runs in it, the output is TAR's. It was refused as a patch that replaces TAR's."""
    model, tar, run = wan_with_tar(comfy)
    expected = run(tar)
    calls = tar_calls(monkeypatch)
    assert torch.equal(run(wrap_forwards(tar, blocks)), expected)
    assert len(calls) == 2 * STEPS
    scaled = run(wrap_self_attention(tar, 0.9))  # a wrapper that rescales
    assert torch.equal(scaled, run(NODE().apply(wrap_self_attention(model, 0.9), 1.0, 1.0)[0]))


@pytest.mark.parametrize("blocks", [[0], [0, 1]])
def test_a_later_wrapper_is_judged_by_a_call_that_ran_the_blocks(comfy, caplog, blocks):
    """The first model call of the window skipped by a cache node (none of TAR's modules ran, nor the later node's
    wrapper) does not tell a wrapper from a replacement: the next call, which runs the blocks, does (where the wrapper
    was on every block, the skipped call refused it)."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 4, 4)
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0, start_percent=0.25)  # the window from the second step
    expected = sample(comfy, cache_node(tar, skip_every=2), shape, cond, uncond, dtype)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        out = sample(comfy, cache_node(wrap_forwards(tar, blocks), skip_every=2), shape, cond, uncond, dtype)
    assert torch.equal(out, expected)
    (said,) = warnings_of(caplog, "VSTAR_TAR")
    assert said.getMessage().startswith("VSTAR_TAR: a model call in the window ran none of the regularized")


def test_a_later_patch_is_judged_by_a_call_that_ran_its_module(comfy, monkeypatch, caplog):
    """A cache skipping block 1 in the window's first model call, where a later node patches block 1's self-attention:
    that call ran neither TAR's module nor the later patch there, so it does not tell a wrapper from a replacement (a
    wrapper was refused); the next call, which runs every block, does: a wrapper composes, a replacement is refused
    there."""
    model, tar, run = wan_with_tar(comfy)
    expected = run(skip_block(tar, 1, skips=1))
    calls = tar_calls(monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        assert torch.equal(run(skip_block(wrap_forwards(tar, [1]), 1, skips=1)), expected)
    assert len(calls) == 2 * STEPS - 1  # a call per step (cond and uncond in one batch), two blocks: one skipped
    (said,) = warnings_of(caplog, "VSTAR_TAR")
    assert said.getMessage().startswith("VSTAR_TAR: a model call in the window ran 1 of the 2 regularized")
    later = tar.clone()
    path = "diffusion_model.blocks.1.self_attn.forward"
    module = later.get_model_object("diffusion_model.blocks.1.self_attn")
    later.add_object_patch(path, lambda *args, **kwargs: type(module).forward(module, *args, **kwargs))
    calls.clear()
    with pytest.raises(RuntimeError, match=rf"VSTAR_TAR: the object patch on {path} is \S+<lambda>, set by a node "
                                           r"after VSTAR_TAR: it replaces TAR's patch there"):
        run(skip_block(later, 1, skips=1))
    assert len(calls) == 2  # block 0's TAR in the first two calls: the second, which ran block 1, refused it


class _Runs(torch.nn.Module):
    """Another module in place of a block, holding it and calling it (none of its attributes handed on)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return self.block(*args, **kwargs)


@pytest.mark.parametrize("other_block", ["a copy", "a module running it"])
def test_a_later_patch_is_judged_with_another_branchs_patches_on_the_model(comfy, monkeypatch, other_block):
    """Another branch of the graph (the loader's model cloned, another module in place of block 1) sampled last, its
    object patches left on the shared model until this sampling run loads its own, as ComfyUI leaves them: a later
    node's patch that replaces TAR's on block 1's self-attention is refused, as without that branch. The hook that
    tells a call ran block 1's self-attention went on the module the shared model held when sampling started (that
    branch's, which never runs): the replacement ran unrefused, TAR off there, a warning only (or, for a module
    without the attribute, an AttributeError)."""
    model, tar, run = wan_with_tar(comfy)
    path = "diffusion_model.blocks.1.self_attn.forward"
    module = tar.get_model_object("diffusion_model.blocks.1.self_attn")
    later = tar.clone()
    later.add_object_patch(path, lambda *args, **kwargs: type(module).forward(module, *args, **kwargs))
    other = model.clone()
    block = model.get_model_object("diffusion_model.blocks.1")
    other.add_object_patch("diffusion_model.blocks.1", copy.deepcopy(block) if other_block == "a copy" else
                           _Runs(block))
    other.patch_model()
    loads = later.patch_model

    def load():  # ComfyUI's load: the model's last patcher unpatched, then this one's patches put on
        other.unpatch_model()
        loads()
    monkeypatch.setattr(later, "patch_model", load)
    try:
        with pytest.raises(RuntimeError, match=rf"VSTAR_TAR: the object patch on {path} is \S+<lambda>, set by a "
                                               r"node after VSTAR_TAR: it replaces TAR's patch there"):
            run(later)
    finally:
        other.unpatch_model()
    assert not any(hasattr(m, "vstar_tar_called_in") for m in model.model.modules())


def test_a_later_patch_that_replaces_tars_on_one_path_is_refused_after_the_first_call(comfy, monkeypatch):
    """A later node's patch on one of TAR's paths that does not call TAR's: the window's first model call, which ran
    TAR's other modules and not that one, refuses it, naming the path and the patch. A later node that takes TAR's
    patch off is refused when sampling starts."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 4, 4)
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0, start_percent=0.25)
    later = tar.clone()
    path = "diffusion_model.blocks.1.self_attn.forward"
    module = later.get_model_object("diffusion_model.blocks.1.self_attn")
    later.add_object_patch(path, lambda *args, **kwargs: type(module).forward(module, *args, **kwargs))
    calls = tar_calls(monkeypatch)
    with pytest.raises(RuntimeError, match=rf"VSTAR_TAR: the object patch on {path} is \S+<lambda>, set by a node "
                                           r"after VSTAR_TAR: it replaces TAR's patch there \(TAR's did not run "
                                           r"there in a model call of the window\), so TAR would not run\. Apply "
                                           r"VSTAR_TAR after that node"):
        sample(comfy, later, shape, cond, uncond, dtype)
    assert len(calls) == 1  # block 0's TAR, in the window's first call (the second step's)
    assert marked(vars(module).get("forward")) is None
    taken = tar.clone()
    del taken.object_patches[path]
    with pytest.raises(RuntimeError, match=rf"VSTAR_TAR: a node after VSTAR_TAR took TAR's object patch off {path}"):
        sample(comfy, taken, shape, cond, uncond, dtype)


@pytest.mark.parametrize("replaced", ["diffusion_model", "diffusion_model.blocks", "diffusion_model.blocks.1",
                                      "diffusion_model.blocks.1.self_attn"])
def test_a_module_a_later_node_replaced_around_the_attention_is_refused(comfy, replaced):
    """A node after VSTAR_TAR that puts another module in place of a self-attention TAR patched, or of one holding
    it: the model ran that module, not the one TAR's patch is on (stock, where it held every self-attention, with a
    warning blaming a cache node), and ComfyUI, putting the patches back in the order they were made, left TAR's
    forward on the loader's model. Refused when sampling starts, naming the path and the module, before anything
    is patched; a torch.compile wrapper of the same module put there is no other module."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 4, 4)
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0)
    later = tar.clone()
    found = model.get_model_object(replaced)
    later.add_object_patch(replaced, copy.deepcopy(found))
    holds = "" if replaced.endswith("self_attn") else r", which holds the self-attention diffusion_model\.blocks\."
    with pytest.raises(RuntimeError, match=rf"VSTAR_TAR: a node after VSTAR_TAR put another module in place of "
                                           rf"{replaced} \(an object patch, a \S+{type(found).__name__}\){holds}.*"
                                           r"Leave that node out"):
        sample(comfy, later, shape, cond, uncond, dtype)
    own = model.get_model_object("diffusion_model")
    assert not later.object_patches_backup and not any(marked(vars(m).get("forward")) for m in own.modules())
    if replaced == "diffusion_model":
        compiled = tar.clone()
        compiled.add_object_patch(replaced, torch.compile(found, backend="eager"))
        assert torch.equal(sample(comfy, compiled, shape, cond, uncond, dtype),
                           sample(comfy, tar, shape, cond, uncond, dtype))


def test_a_later_node_that_puts_a_holder_of_the_same_modules_in_place_composes(comfy):
    """A node after VSTAR_TAR that object-patches a module holding the same self-attentions (a list of the same
    blocks; a module calling the model it holds, its attributes handed on): the model runs the modules TAR's
    patches are on, so TAR runs (it was refused as another module in place, which it is not), and nothing of
    TAR's is left on the model after sampling."""
    model, tar, run = wan_with_tar(comfy)
    expected = run(tar)

    class Holder(torch.nn.Module):
        def __init__(self, held):
            super().__init__()
            self.held = held

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(super().__getattr__("held"), name)

        def forward(self, *args, **kwargs):
            return self.held(*args, **kwargs)

    own = model.get_model_object("diffusion_model")
    for path, holder in (("diffusion_model.blocks", torch.nn.ModuleList(list(own.blocks))),
                         ("diffusion_model", Holder(own))):
        later = tar.clone()
        later.add_object_patch(path, holder)
        assert torch.equal(run(later), expected), path
        assert not any(marked(vars(m).get("forward")) for m in own.modules()), path


def test_cache_nodes_that_drop_transformer_options_compose(comfy, caplog):
    """TeaCache and MagCache run Wan's blocks without transformer_options: TAR still runs in them. A call whose
    blocks the cache skips regularizes nothing, and says so once per sampling run."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 4, 4)
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0)
    expected = sample(comfy, tar, shape, cond, uncond, dtype)
    assert not torch.equal(expected, sample(comfy, model, shape, cond, uncond, dtype))
    assert torch.equal(sample(comfy, cache_node(tar), shape, cond, uncond, dtype), expected)
    assert torch.equal(sample(comfy, NODE().apply(cache_node(model), 1.0, 1.0)[0], shape, cond, uncond, dtype),
                       expected)
    assert not warnings_of(caplog, "VSTAR_TAR")
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        sample(comfy, cache_node(tar, skip_every=2), shape, cond, uncond, dtype)
    (skipped,) = warnings_of(caplog, "VSTAR_TAR")
    assert "a model call in the window ran none of the regularized self-attention modules: another node skipped " \
           "the model's computation (a cache node reusing an earlier result does)" in skipped.getMessage()


def skipping_steps(model, skipped):
    """LazyCache's way (emulated): a wrapper around the model call that, at the steps `skipped` (call indices, one
    call a step), returns the previous step's output (its input, at the first step) without calling the model."""
    model = model.clone()
    state = {"calls": 0, "last": None}

    def wrapper(apply_model, args):
        step, state["calls"] = state["calls"], state["calls"] + 1
        if step not in skipped:
            state["last"] = apply_model(args["input"], args["timestep"], **args["c"])
        return args["input"] if state["last"] is None else state["last"]
    model.set_model_unet_function_wrapper(wrapper)
    return model


@pytest.mark.parametrize("start, end, said", [(0.0, 1.0, "1 of the 4 steps"), (0.25, 1.0, "1 of the 3 steps"),
                                              (0.0, 0.25, None)])
def test_steps_a_node_skips_the_model_in_are_said(comfy, caplog, start, end, said):
    """A node that skips the model in whole steps (LazyCache) keeps the node from seeing them: at the run's end the
    schedule's steps in the window that no model call ran at are counted and said (step 2 here), and nothing is
    said where they lie outside the window."""
    dtype = torch.float64
    model = skipping_steps(wan(comfy, dtype), skipped={2})
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0, start_percent=start, end_percent=end)
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        sample(comfy, tar, (1, 4, 3, 4, 4), cond, uncond, dtype)
    messages = [w.getMessage() for w in warnings_of(caplog, "VSTAR_TAR")]
    assert messages == ([f"VSTAR_TAR: {said} of this sampling run in the window ran no model call, so TAR did not "
                         "run in them: a node skipped the model there (LazyCache reuses an earlier step's result)"]
                        if said else [])


@pytest.mark.parametrize("first, missed", [(1.0, 0), (0.9999, 0), (0.99, 0), (0.75, 1)])
def test_a_flow_models_first_sigma_moved_down_is_its_first_step(first, missed):
    """ComfyUI's SDE-family samplers call a flow model's first step of sigma 1 a little lower (percent_to_sigma(1e-4):
    0.9999 at shift 1, lower below it): that call runs the step; a call at the next step's sigma or lower does not."""
    schedule = [1.0, 0.75, 0.5, 0.25, 0.0]
    run = Run((1, 4, 3, 4, 4))
    for sigma in (torch.tensor(first, dtype=torch.float32).item(), 0.75, 0.5, 0.25):
        run.saw([sigma], (0.0, 1.0, 0.0, 1.0), True, schedule)
    assert run.steps_missed() == (missed, 4)


def test_a_run_whose_every_step_a_node_skips_is_said(comfy, caplog):
    """No model call of a run reached the node (a node skipped the model at every step): said at the run's end."""
    dtype = torch.float64
    model = skipping_steps(wan(comfy, dtype), skipped=set(range(STEPS)))
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0)
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        sample(comfy, tar, (1, 4, 3, 4, 4), cond, uncond, dtype)
    assert [w.getMessage() for w in warnings_of(caplog, "VSTAR_TAR")] == [
        "VSTAR_TAR: no model call of this sampling run reached the node (another node skipped the model, or ran it "
        "without ComfyUI's model call), so TAR did not run"]


@pytest.mark.parametrize("case", ["wan", "joint attention with text", "a reference frame before it"])
def test_one_frame_runs_without_tar_and_says_so(comfy, caplog, case):
    """A model call whose video has one latent frame (Wan at length 1, an image; one frame after a reference frame;
    HunyuanVideo's one frame in a joint attention with the text, whose keys would get no bias) runs without TAR,
    stock bit for bit, and the node says so once per run. Two frames of video say nothing."""
    dtype = torch.float64
    model = hunyuan(comfy, dtype) if case == "joint attention with text" else wan(comfy, dtype)
    cond, uncond = conditions(dtype)
    lead = 1 if case == "a reference frame before it" else 0
    (tar,) = NODE().apply(model, 5.0, 0.1, reference_frames=lead)
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        out = sample(comfy, tar, (1, 4, 1 + lead, 4, 4), cond, uncond, dtype)
    (said,) = warnings_of(caplog, "VSTAR_TAR")
    assert said.getMessage() == ("VSTAR_TAR: a model call in the window has one latent frame of video: TAR needs two "
                                 "frames or more, so such calls run without TAR (the stock model's output) (said once "
                                 "per sampling run)")
    assert torch.equal(out, sample(comfy, model, (1, 4, 1 + lead, 4, 4), cond, uncond, dtype))
    caplog.clear()
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        two = sample(comfy, tar, (1, 4, 2 + lead, 4, 4), cond, uncond, dtype)
    assert not warnings_of(caplog, "VSTAR_TAR")
    assert not torch.equal(two, sample(comfy, model, (1, 4, 2 + lead, 4, 4), cond, uncond, dtype))


def test_a_call_that_runs_some_regularized_modules_says_so(comfy, caplog):
    """A node that computes a block without its self-attention module (a pass that skips the block, as skip-layer
    guidance's does; an attn1 replace patch on SVD): TAR cannot run there, and the node says how many of its
    modules a model call ran, once per run."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    cond, uncond = conditions(dtype)
    skipping = model.clone()
    blocks = len(skipping.get_model_object("diffusion_model").blocks)
    skipping.add_object_patch(f"diffusion_model.blocks.{blocks - 1}.forward", lambda x, *args, **kwargs: x)
    (tar,) = NODE().apply(skipping, 1.0, 1.0)
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        sample(comfy, tar, (1, 4, 3, 4, 4), cond, uncond, dtype)
    (said,) = warnings_of(caplog, "VSTAR_TAR")
    assert f"a model call in the window ran {blocks - 1} of the {blocks} regularized self-attention modules" \
           in said.getMessage()


@pytest.mark.parametrize("order", ["before", "after"])
def test_a_self_attention_that_guidance_skips_is_said(comfy, monkeypatch, caplog, order):
    """Newer ComfyUI's LTX spatio-temporal guidance runs a model call per step in which the self-attention of some
    blocks returns its values without attention (the block's transformer_options say stg_skip_self_attn): with the
    node before or after the guidance, those modules run as it asks, the others are regularized, and a warning says
    how many ran; a module making no attention call without that flag stays an error."""
    dtype = torch.float64
    cond, uncond = conditions(dtype)
    model = wan(comfy, dtype)
    skipping = model.get_model_object("diffusion_model.blocks.1.self_attn")
    attention = comfy.ldm.wan.model.WanSelfAttention
    own = attention.forward

    def forward(self, x, transformer_options={}):
        if self is skipping and (transformer_options.get("stg_skip_self_attn") or not flagged):
            return self.v(x)
        return own(self, x, transformer_options=transformer_options)
    monkeypatch.setattr(attention, "forward", forward)

    def guided(model):
        model = model.clone()
        model.model_options["transformer_options"]["stg_skip_self_attn"] = True
        return model
    flagged = True
    tar = guided(NODE().apply(model, 1.0, 1.0)[0]) if order == "after" else NODE().apply(guided(model), 1.0, 1.0)[0]
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        out = sample(comfy, tar, (1, 4, 3, 4, 4), cond, uncond, dtype)
    (said,) = warnings_of(caplog, "VSTAR_TAR")
    assert "a model call in the window ran 1 of the 2 regularized self-attention modules" in said.getMessage()
    assert not torch.equal(out, sample(comfy, guided(model), (1, 4, 3, 4, 4), cond, uncond, dtype))
    flagged = False
    with pytest.raises(RuntimeError, match="blocks.1.self_attn computed its attention without ComfyUI's attention "
                                           "override"):
        sample(comfy, NODE().apply(model, 1.0, 1.0)[0], (1, 4, 3, 4, 4), cond, uncond, dtype)


def test_freelong_windows_run_without_tar_and_say_so(comfy, mark_self_attention, caplog):
    """LongLook's FreeLong runs each block again on windows of frames, whose frames the attention call does not
    carry: those calls are handed on as they came (no error for FreeLong to catch), said once per run; the
    blocks' passes over the whole video are regularized."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 4, 4, 4)     # 4 frames x 4 tokens
    cond, uncond = conditions(dtype)
    errors = []
    (tar,) = NODE().apply(model, 1.0, 1.0, backend="reference")
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        out = sample(comfy, freelong(tar, 4, 2, errors), shape, cond, uncond, dtype)
    assert errors == []
    (said,) = warnings_of(caplog, "VSTAR_TAR")
    assert "blocks.0.self_attn ran its self-attention over 8 tokens, but this model call's latent makes 4 frames x 4 " \
           "tokens (16 tokens): another node ran it on other tokens (LongLook's FreeLong does" in said.getMessage()
    stock = sample(comfy, freelong(model, 4, 2, []), shape, cond, uncond, dtype)
    expected = oracle_sample(comfy, freelong(model, 4, 2, []), video_ids(4, 4, 4), 1.0, 1.0, range(STEPS), shape,
                             cond, uncond, dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert (out - stock).abs().max() > 1e-3


def test_nag_on_the_cross_attention_composes(comfy, mark_self_attention):
    """KJNodes' WanVideoNAG patches the blocks' cross-attention: applied before or after the node, TAR runs in the
    self-attention of the model NAG changed."""
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 4, 4)
    cond, uncond = conditions(dtype)
    expected = oracle_sample(comfy, nag(model, 0.5), video_ids(3, 4, 4), 1.0, 1.0, range(STEPS), shape, cond, uncond,
                             dtype)
    assert not torch.equal(sample(comfy, nag(model, 0.5), shape, cond, uncond, dtype),
                           sample(comfy, model, shape, cond, uncond, dtype))
    for tar in (nag(NODE().apply(model, 1.0, 1.0, backend="reference")[0], 0.5),
                NODE().apply(nag(model, 0.5), 1.0, 1.0, backend="reference")[0]):
        torch.testing.assert_close(sample(comfy, tar, shape, cond, uncond, dtype), expected, rtol=0, atol=1e-10)


def test_an_error_another_node_catches_is_raised_after_the_call(comfy):
    (tar,) = NODE().apply(wan(comfy), 1.0, 1.0, backend="triton")      # float64: not a Triton kernel dtype
    with pytest.raises(BackendUnavailableError, match="float64 is not a kernel dtype"):
        sample(comfy, swallowing(tar), (1, 4, 2, 4, 4), *conditions(torch.float64), torch.float64)


def test_a_comfyui_without_the_attention_override_is_refused(comfy, monkeypatch):
    monkeypatch.delattr(comfy.ldm.modules.attention, "wrap_attn")
    with pytest.raises(RuntimeError, match=r"VSTAR_TAR needs ComfyUI 0\.3\.60 or newer, whose attention functions "
                                           r"hand each call to .*this ComfyUI \(of unknown version\) has no such "
                                           r"override"):
        NODE().apply(wan(comfy), 1.0, 1.0)


def test_attention_keywords_the_node_does_not_know_pass(comfy, mark_self_attention, monkeypatch):
    newer_attention(monkeypatch, comfy.ldm.wan.model, slices=False)
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 4, 6)
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0, backend="reference")
    out = sample(comfy, tar, shape, cond, uncond, dtype)
    expected = oracle_sample(comfy, model, video_ids(3, 4, 6), 1.0, 1.0, range(STEPS), shape, cond, uncond, dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_query_slices_are_handed_on_as_they_came(comfy, monkeypatch, caplog):
    """A self-attention computed in query slices: a slice's rows are not known, so the calls go, unchanged (their
    keywords too), to the override that was there, and the node says so once per run."""
    newer_attention(monkeypatch, comfy.ldm.wan.model, slices=True)
    dtype = torch.float64
    model = wan(comfy, dtype)
    shape = (1, 4, 3, 4, 6)     # 3 frames x 6 tokens: slices of 9 queries
    cond, uncond = conditions(dtype)
    stock = sample(comfy, model, shape, cond, uncond, dtype)
    calls = []
    chained = model.clone()
    chained.model_options["transformer_options"]["optimized_attention_override"] = keyword_recorder(calls)
    (tar,) = NODE().apply(chained, 1.0, 1.0)
    with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
        assert torch.equal(sample(comfy, tar, shape, cond, uncond, dtype), stock)
    (said,) = warnings_of(caplog, "VSTAR_TAR")
    assert "blocks.0.self_attn computed its self-attention in query slices (9 of 18 queries in a call)" \
           in said.getMessage()
    assert sorted(set(calls)) == [(9, 18, False), (18, 7, False)]
    assert calls.count((9, 18, False)) == 2 * 2 * STEPS


WINDOWS = {   # windows of 8 latent frames, reference_frames
    "overlapping, one reference frame": ([[0, 1, 2, 3], [3, 4, 5, 6], [4, 5, 6, 7]], 1),
    "strided": ([[0, 2, 4, 6], [1, 3, 5, 7]], 0),
    "looped": ([[6, 7, 0, 1], [1, 2, 3, 4], [4, 5, 6, 7]], 0),
    "looped, strided": ([[4, 6, 0, 2], [1, 3, 5, 7], [0, 1, 2, 3]], 0),
}


@pytest.mark.parametrize("retain", [(), (0,), (0, 2)], ids=["", "retaining frame 0", "retaining frames 0, 2"])
@pytest.mark.parametrize("causal_window_fix", [False, True], ids=["", "causal anchors"])
@pytest.mark.parametrize("case", list(WINDOWS))
def test_context_windows_take_the_global_frame_indices(comfy, mark_self_attention, case, causal_window_fix, retain):
    """In a context window, a frame's id is its index in the whole latent, in time (a looped window's frames stay
    consecutive across the latent's end); the reference frames are the whole latent's first ones, so only a
    window holding them has any. With newer ComfyUI's causal_window_fix (its default) a window that does not start
    at frame 0 runs with the frame before it in front (its causal_anchor_index), which is that frame too. Newer
    ComfyUI's latent_retain_index_list puts the whole latent's frame k at each window's position k: its id is k
    (a reference frame's -1; in a window across the latent's end, k + 8 where k is before the window's first frame,
    a loop further on, as its other frames are), where the node once gave it the id of the frame it replaced."""
    windows, lead = WINDOWS[case]
    dtype = torch.float64
    model = wan(comfy, dtype)
    model.model_options["context_handler"] = comfy.context_windows.FixedContextHandler(
        windows, causal_window_fix=causal_window_fix, latent_retain_index_list=retain)
    shape = (1, 4, 8, 4, 4)
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(model, 1.0, 1.0, reference_frames=lead, backend="reference")
    out = sample(comfy, tar, shape, cond, uncond, dtype)

    def ids(options):
        index = options["context_window"].frames()
        times, first, wraps = in_time(index, 8), index[0], any(b <= a for a, b in zip(index, index[1:]))
        for k in retain:
            index[k], times[k] = k, k + (8 if wraps and k < first else 0)
        return torch.tensor([t if i >= lead else -1 for i, t in zip(index, times) for _ in range(4)])
    expected = oracle_sample(comfy, model, ids, 1.0, 1.0, range(STEPS), shape, cond, uncond, dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_a_negative_retained_latent_index_is_refused(comfy, mark_self_attention):
    """A negative index in latent_retain_index_list: which frame of the whole latent it retains is not known to the
    node (an LTX-Video latent's end holds the keyframe guides' frames), so the call is an error, not a guess."""
    model = wan(comfy, torch.float64)
    model.model_options["context_handler"] = comfy.context_windows.FixedContextHandler(
        WINDOWS["strided"][0], latent_retain_index_list=(-1,))
    cond, uncond = conditions(torch.float64)
    (tar,) = NODE().apply(model, 1.0, 1.0, backend="reference")
    with pytest.raises(ValueError, match=r"latent_retain_index_list \[-1\] .* which frame a negative index"):
        sample(comfy, tar, (1, 4, 8, 4, 4), cond, uncond, torch.float64)


def test_retained_frames_in_a_temporal_crop_of_a_window_are_refused(comfy):
    """A model call on 2 of a window's 4 frames (an area conditioning over time) numbers them from the window's
    first, which TAR, a function of frame differences, may take; with latent_retain_index_list the retained frame's
    id would be set at a position the crop may not hold (0 and 5 for frames one apart, once). Refused."""
    patch = vc.patch.TARPatch(vc.patch.Settings(1.0, 1.0, 0.0, 1.0, reference_frames=0, backend="auto"),
                              vc_models.WAN, {})
    run = Run((1, 16, 8, 4, 4))
    window = comfy.context_windows.IndexListContextWindow([4, 5, 6, 7], dim=2)
    assert patch.frame_ids(TokenLayout(2, 4), {"context_window": window}, run, frames=2) == (4, 5)
    run.retained = (0,)
    assert patch.frame_ids(TokenLayout(4, 4), {"context_window": window}, run, frames=4) == (0, 5, 6, 7)
    with pytest.raises(ValueError, match=r"runs on 2 of the window's 4 frames \(a temporal crop\)"):
        patch.frame_ids(TokenLayout(2, 4), {"context_window": window}, run, frames=2)


def test_a_call_passes_its_frames_as_a_frame_layout_where_they_are_in_order():
    """Video frames in order, from 0 or from a context window's first, go as a FrameLayout from 0 (the same frame
    distances, all the Gaussian reads; the ids then not read on the host); a reference frame (-1), a strided or
    looped window's ids go as ids, and the text after the layout is the layout's text_after."""
    settings = vc.patch.Settings(1.0, 1.0, 0.0, 1.0, reference_frames=0, backend="auto")
    layout = TokenLayout(4, 3, before=2)

    def frames(ids, n=14):
        return vc.patch.RegularizedCall(settings, layout, ids, torch.device("cpu"), Run(())).frames(n)
    assert frames((0, 1, 2, 3)) == frames((5, 6, 7, 8)) == FrameLayout(4, 3, text_before=2)
    assert frames((5, 6, 7, 8), 19) == FrameLayout(4, 3, text_before=2, text_after=5)
    for ids in ((-1, 0, 1, 2), (0, 2, 4, 6), (6, 7, 0, 1)):
        got = frames(ids, 16)
        assert torch.equal(got, torch.tensor([-1] * 2 + [i for i in ids for _ in range(3)] + [-1] * 2,
                                             dtype=torch.int32)), ids


def test_a_looped_window_needs_the_latent_length(comfy):
    """Outside ComfyUI's sampler (no OUTER_SAMPLE wrapper: the latent's length unknown) a window that wraps around
    is an error, never ids that put its last frames far from its first."""
    settings = vc.patch.Settings(1.0, 1.0, 0.0, 1.0, reference_frames=0, backend="auto")
    wrapper = vc.patch.TARPatch(settings, vc_models.WAN, {})
    layout = TokenLayout(4, 4)
    window = comfy.context_windows.IndexListContextWindow([6, 7, 0, 1], dim=2)
    assert wrapper.frame_ids(layout, {"context_window": window}, vc.patch.Run((1, 4, 8, 4, 4))) == (6, 7, 8, 9)
    with pytest.raises(ValueError, match=r"the context window \[6, 7, 0, 1\] wraps around the latent's end, and the "
                                         r"latent's length is not known"):
        wrapper.frame_ids(layout, {"context_window": window}, vc.patch.Run(()))


# ---------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("breaking", [True, False], ids=["an attention that breaks the graph", "whole blocks"])
def test_torch_compile_traces_the_blocks_once(comfy, caplog, breaking):
    """ComfyUI's TorchCompileModel on a model with the node: the frames compiled do not grow with the blocks (a
    block's patch once recompiled each block, and dynamo's limit of 8 recompiles left most blocks of a 12-block
    model uncompiled), the result is TAR's, and the node sees every block run (test_comfyui_real.py has the case
    that once warned otherwise)."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    dtype = torch.float64
    shape = (1, 4, 3, 4, 4)
    cond, uncond = conditions(dtype)
    frames = {}
    for layers in (2, 5):
        model = wan(comfy, dtype, num_layers=layers)
        model = graph_breaking_attention(model) if breaking else model
        (tar,) = NODE().apply(model, 1.0, 1.0, backend="reference")
        compiled = tar.clone()
        set_torch_compile_wrapper(compiled, backend="eager")
        with caplog.at_level(logging.WARNING, "vstar_kernels.comfyui"):
            out, frames[layers] = compiled_frames(lambda: sample(comfy, compiled, shape, cond, uncond, dtype))
        said = [w.getMessage() for w in warnings_of(caplog, "VSTAR_TAR")]  # the breaking override's own, no other
        assert bool(said) == breaking and all("the attention override on the model" in m for m in said), said
        caplog.clear()
        assert torch.equal(out, sample(comfy, tar, shape, cond, uncond, dtype))
        assert not torch.equal(out, sample(comfy, model, shape, cond, uncond, dtype))
    assert frames[5] <= frames[2], frames


def test_torch_compile_keeps_the_check_of_a_later_patch(comfy):
    """TorchCompileModel on a model whose self-attention forwards a later node patched, with block 1 skipped in the
    first call: a wrapper composes (the result is TAR's), a replacement is refused; the pre-hooks that tell a call
    ran those modules are traced with the blocks."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    model, tar, run = wan_with_tar(comfy)
    expected = run(skip_block(tar, 1, skips=1))
    later = wrap_forwards(tar, [0, 1])
    set_torch_compile_wrapper(later, backend="eager")
    torch._dynamo.reset()
    assert torch.equal(run(skip_block(later, 1, skips=1)), expected)
    module = later.get_model_object("diffusion_model.blocks.1.self_attn")
    later.add_object_patch("diffusion_model.blocks.1.self_attn.forward",
                           lambda *args, **kwargs: type(module).forward(module, *args, **kwargs))
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=r"the object patch on diffusion_model\.blocks\.1\.self_attn\.forward "
                                           r"is \S+<lambda>, set by a node after VSTAR_TAR"):
        run(skip_block(later, 1, skips=1))


def test_torch_compile_does_not_recompile_for_each_windows_frames(comfy):
    """TorchCompileModel with context windows whose frames go as ids (strided windows, each its own): the frames
    compiled do not grow with the windows (their ids, made in the graph, once recompiled it for each window's
    frames, up to dynamo's limit of 8), and the result is the node's without compile."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    dtype = torch.float64
    shape = (1, 4, 8, 4, 4)
    cond, uncond = conditions(dtype)
    frames = {}
    for windows in ([[0, 2, 4, 6], [1, 3, 5, 7]],
                    [[0, 2, 4, 6], [1, 3, 5, 7], [0, 3, 5, 7], [1, 2, 4, 6], [0, 1, 3, 6], [2, 4, 5, 7]]):
        model = wan(comfy, dtype)
        model.model_options["context_handler"] = comfy.context_windows.FixedContextHandler(windows)
        (tar,) = NODE().apply(model, 1.0, 1.0, backend="reference")
        compiled = tar.clone()
        set_torch_compile_wrapper(compiled, backend="eager")
        out, frames[len(windows)] = compiled_frames(lambda: sample(comfy, compiled, shape, cond, uncond, dtype))
        assert torch.equal(out, sample(comfy, tar, shape, cond, uncond, dtype))
    assert frames[6] <= frames[2], frames


def test_torch_compile_of_a_joint_attention(comfy, monkeypatch):
    """HunyuanVideo's video-then-text attention compiled: its frames are a FrameLayout whose ids are made in the
    graph, their values not read (a host synchronisation on a GPU); the result is TAR's."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    dtype = torch.float64
    shape = (1, 4, 3, 6, 5)
    cond, uncond = conditions(dtype, text=6)
    (tar,) = NODE().apply(hunyuan(comfy, dtype), 1.0, 1.0, backend="reference")
    compiled = tar.clone()
    set_torch_compile_wrapper(compiled, backend="eager")
    reads = ValueReads(monkeypatch)
    out, _ = compiled_frames(lambda: sample(comfy, compiled, shape, cond, uncond, dtype))
    assert reads.of_ids() == []
    assert torch.equal(out, sample(comfy, tar, shape, cond, uncond, dtype))


def test_a_compile_guard_filter_keeps_the_window(comfy):
    """KJNodes' TorchCompileModelAdvanced compiles with a guard filter that drops the guards on transformer_options;
    the node does not keep the call under way there, so a graph compiled for the steps before the window does not
    run in it: the result is the node's without compile."""
    dtype = torch.float64
    shape = (1, 4, 3, 4, 4)
    cond, uncond = conditions(dtype)
    (tar,) = NODE().apply(wan(comfy, dtype), 1.0, 1.0, start_percent=0.5, backend="reference")
    out, _ = compiled_frames(lambda: sample(comfy, guard_filtered_compile(tar), shape, cond, uncond, dtype))
    assert torch.equal(out, sample(comfy, tar, shape, cond, uncond, dtype))


def test_a_compiled_diffusion_model_is_unwrapped(comfy):
    """A diffusion model compiled before the node (put in place by an object patch) is the model it compiled."""
    dtype = torch.float64
    shape = (1, 4, 3, 4, 4)
    cond, uncond = conditions(dtype)
    model = wan(comfy, dtype)
    compiled = model.clone()
    compiled.add_object_patch("diffusion_model", torch.compile(model.get_model_object("diffusion_model"),
                                                               backend="eager"))
    (tar,) = NODE().apply(compiled, 1.0, 1.0, backend="reference")
    out, _ = compiled_frames(lambda: sample(comfy, tar, shape, cond, uncond, dtype))
    assert torch.equal(out, sample(comfy, NODE().apply(model, 1.0, 1.0, backend="reference")[0], shape, cond, uncond,
                                   dtype))
