"""Companion nodes and newer ComfyUI, as the ComfyUI node's tests emulate them (test_comfyui.py on the stand-in,
test_comfyui_real.py on a real ComfyUI): written here from the behaviour of those nodes, none of their code.
Each takes and returns a ModelPatcher (or patches a module) and works on the stand-in's Wan and on ComfyUI's."""

import copy
import logging
import unittest.mock

import torch

import vstar_kernels.comfyui.patch


def tar_calls(monkeypatch):
    """The list of the node's tar_attention calls (their q shapes), from now on."""
    calls = []
    original = vstar_kernels.comfyui.patch.tar_attention

    def counting(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return original(q, *args, **kwargs)
    monkeypatch.setattr(vstar_kernels.comfyui.patch, "tar_attention", counting)
    return calls


def replace_self_attention(model, weight):
    """A clone of a Wan `model` whose blocks' self-attention forward is object-patched as nodes that patch it do:
    call the module's class forward and scale its output by 1 + weight * tanh(mean input) (an Enhance-A-Video
    patch rescales it; with weight 0, a backend patch that changes only how the attention runs). Neither calls
    the forward it replaces."""
    model = model.clone()
    for i in range(len(model.get_model_object("diffusion_model").blocks)):
        module = model.get_model_object(f"diffusion_model.blocks.{i}.self_attn")

        def forward(x, *args, module=module, **kwargs):
            return type(module).forward(module, x, *args, **kwargs) * (1 + weight * torch.tanh(x.mean()))
        model.add_object_patch(f"diffusion_model.blocks.{i}.self_attn.forward", forward)
    return model


REPLACED = (r"the object patch on diffusion_model.blocks.0.self_attn.forward is \S+replace_self_attention.<locals>."
            r"forward, set by a node after VSTAR_TAR: it replaces TAR's patch there.*Apply VSTAR_TAR after that node")


def compiled_blocks_replacing_one_attention(model):
    """A clone of `model` with each Wan block compiled (object patches, as per-block compile nodes make) and, below
    the first one's wrapper, a copy of its self-attention with other weights (the wrapper hands that patch on to
    the block)."""
    other = model.clone()
    blocks = model.get_model_object("diffusion_model").blocks
    for i, block in enumerate(blocks):
        other.add_object_patch(f"diffusion_model.blocks.{i}", torch.compile(block, backend="eager"))
    module = copy.deepcopy(blocks[0].self_attn)
    with torch.no_grad():
        module.o.weight.mul_(3.0)
    other.add_object_patch("diffusion_model.blocks.0.self_attn", module)
    return other


def another_temporal_transformer(model):
    """(A clone of the SVD `model` with a copy of its first SpatialVideoTransformer, of a class of another name, in
    its place, that transformer's path)."""
    path = next(name for name, module in model.get_model_object("diffusion_model").named_modules()
                if type(module).__name__ == "SpatialVideoTransformer")
    module = copy.deepcopy(model.get_model_object(f"diffusion_model.{path}"))
    module.__class__ = type("AnotherTransformer", (type(module),), {})
    other = model.clone()
    other.add_object_patch(f"diffusion_model.{path}", module)
    return other, path


def cache_node(model, skip_every=0):
    """A cache node's way with Wan (TeaCache, MagCache): a model function wrapper that, in each model call,
    puts in the diffusion model's forward_orig one that runs the blocks without the transformer_options; with
    skip_every=n, every n-th call reuses the previous result instead of running the blocks."""
    model = model.clone()
    dm = model.get_model_object("diffusion_model")
    state = {"calls": 0, "last": None}

    def forward_orig(*args, transformer_options=None, **kwargs):
        state["calls"] += 1
        if not (skip_every and state["calls"] % skip_every == 0):
            state["last"] = type(dm).forward_orig(dm, *args, **kwargs)
        return state["last"]

    def wrapper(apply_model, args):
        with unittest.mock.patch.object(dm, "forward_orig", forward_orig, create=True):
            return apply_model(args["input"], args["timestep"], **args["c"])
    model.set_model_unet_function_wrapper(wrapper)
    return model


def block_replacement(model, patch):
    model = model.clone()
    for i in range(len(model.get_model_object("diffusion_model").blocks)):
        model.set_model_patch_replace(patch, "dit", "double_block", i)
    return model


def wrap_forwards(model, blocks=None):
    """A clone of `model` with the self-attention forward of each of `blocks` (None: every block) object-patched as a
    node after VSTAR_TAR wraps a forward: the forward it finds (TAR's patch) kept and called."""
    model = model.clone()
    for i in range(len(model.get_model_object("diffusion_model").blocks)) if blocks is None else blocks:
        path = f"diffusion_model.blocks.{i}.self_attn.forward"

        def forward(*args, _found=model.get_model_object(path), **kwargs):
            return _found(*args, **kwargs)
        model.add_object_patch(path, forward)
    return model


def skip_block(model, block, skips):
    """A partial cache's way (a first-block cache's kind): the first `skips` times block `block` is called, its input
    is handed on as its output (the block skipped, as a cache reusing a residual skips it); it runs after that."""
    calls = [0]

    def patch(args, extra):
        calls[0] += 1
        return {"img": args["img"]} if calls[0] <= skips else extra["original_block"](args)
    model = model.clone()
    model.set_model_patch_replace(patch, "dit", "double_block", block)
    return model


def cut_tokens(tensor, tokens, cut):
    """`tensor` cut to the tokens `cut` along its first axis of length `tokens` (a rotary embedding's)."""
    axis = list(tensor.shape).index(tokens)
    return tensor[(slice(None),) * axis + (cut,)]


def freelong(model, frames, window, errors):
    """LongLook's FreeLong, its way: each block runs on all tokens, then again on windows of `window` of the
    `frames` frames (one frame apart; tokens, and a rotary embedding, cut to the window), and the two results
    are blended; an error in the windowed pass is caught (appended to `errors`) and the first result stands."""
    def patch(args, extra):
        whole = extra["original_block"](args)["img"]
        tokens = whole.shape[1]
        per_frame = tokens // frames
        local, count = torch.zeros_like(whole), torch.zeros(tokens, 1, dtype=whole.dtype)
        try:
            for start in range(frames - window + 1):
                cut = slice(start * per_frame, (start + window) * per_frame)
                part = {**args, "img": args["img"][:, cut]}
                if args.get("pe") is not None:
                    part["pe"] = cut_tokens(args["pe"], tokens, cut)
                local[:, cut] += extra["original_block"](part)["img"]
                count[cut] += 1
        except Exception as exc:
            errors.append(exc)
            return {"img": whole}
        return {"img": 0.5 * whole + 0.5 * local / count}
    return block_replacement(model, patch)


def swallowing(model):
    """A block replacement that runs a block and, should it fail, leaves the tokens as they were."""
    def patch(args, extra):
        try:
            return extra["original_block"](args)
        except Exception:
            return {"img": args["img"]}
    return block_replacement(model, patch)


def newer_attention(monkeypatch, module, slices):
    """The attention calls of `module` as a newer ComfyUI makes them: each passes low_precision_attention=False,
    and with `slices` a self-attention (as many queries as keys) runs in two query slices (LTX's guide attention)."""
    plain = module.optimized_attention

    def attention(q, k, v, *args, **kwargs):
        kwargs["low_precision_attention"] = False
        if not slices or q.shape[1] != k.shape[1]:
            return plain(q, k, v, *args, **kwargs)
        half = q.shape[1] // 2
        return torch.cat([plain(q[:, :half], k, v, *args, **kwargs), plain(q[:, half:], k, v, *args, **kwargs)], 1)
    monkeypatch.setattr(module, "optimized_attention", attention)


def newer_context_windows(monkeypatch, module):
    """ComfyUI's context windows over a video UNet's frames (dim 0) as newer ComfyUI runs them: the step is found
    from the call's first timestep (0.3.64 compares them all with the schedule, which fails when the batch holds
    the frames)."""
    handler = module.IndexListContextHandler
    find = handler.set_step
    monkeypatch.setattr(handler, "set_step", lambda self, timestep, options: find(self, timestep[:1], options))


def causal_window_fix(monkeypatch, module):
    """ComfyUI's context windows as newer ComfyUI runs them by default (causal_window_fix): a window that does not
    start at the latent's first frame runs with the frame before it in front (the window's causal_anchor_index; its
    index_list unchanged), and that frame's output is dropped."""
    window, handler = module.IndexListContextWindow, module.IndexListContextHandler
    get_tensor, evaluate = window.get_tensor, handler.evaluate_context_windows

    def anchored(self, full, *args, **kwargs):
        anchor = getattr(self, "causal_anchor_index", -1)
        if anchor < 0:
            return get_tensor(self, full, *args, **kwargs)
        index = self.index_list
        self.index_list = [anchor] + list(index)
        try:
            return get_tensor(self, full, *args, **kwargs)
        finally:
            self.index_list = index

    def evaluate_anchored(self, calc, model, x_in, conds, timestep, windows, *args, **kwargs):
        results = []
        for entry in windows:
            anchor = entry[1].index_list[0] - 1
            entry[1].causal_anchor_index = anchor
            for result in evaluate(self, calc, model, x_in, conds, timestep, [entry], *args, **kwargs):
                outs = [out.narrow(self.dim, 1, out.shape[self.dim] - 1) for out in result.sub_conds_out]
                results.append(result._replace(sub_conds_out=outs) if anchor >= 0 else result)
        return results
    monkeypatch.setattr(window, "get_tensor", anchored)
    monkeypatch.setattr(handler, "evaluate_context_windows", evaluate_anchored)


def keyword_recorder(calls):
    """An override on the model that records each call's (queries, keys, low_precision_attention) of (B, L, H*D)
    q and k, and runs the call as it came."""
    def override(func, q, k, *args, **kwargs):
        calls.append((q.shape[1], k.shape[1], kwargs.get("low_precision_attention")))
        return func(q, k, *args, **kwargs)
    return override


def graph_breaking_attention(model, attention=None):
    """A clone of `model` with an attention override that breaks torch.compile's graph in every call it gets and
    runs `attention` (else the function the call came to), as KJNodes' Sage attention patch does (its kernel is not
    traced): each block is then a frame of its own."""
    model = model.clone()

    def override(func, *args, **kwargs):
        torch._dynamo.graph_break()
        return (attention or func)(*args, **kwargs)
    model.model_options["transformer_options"]["optimized_attention_override"] = override
    return model


def guard_filtered_compile(model):
    """KJNodes' TorchCompileModelAdvanced in its default mode: torch.compile (ComfyUI's wrapper) with a guard filter
    that drops every guard on transformer_options."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    model = model.clone()
    set_torch_compile_wrapper(model, backend="eager", options={
        "guard_filter_fn": lambda entries: ["transformer_options" not in entry.name for entry in entries]})
    return model


def nag(model, weight):
    """Normalized attention guidance, as KJNodes' WanVideoNAG does it: an object patch on each block's
    cross-attention forward that extrapolates its output away from a negative context's (here the context
    negated), leaving the self-attention alone."""
    model = model.clone()
    for i in range(len(model.get_model_object("diffusion_model").blocks)):
        module = model.get_model_object(f"diffusion_model.blocks.{i}.cross_attn")

        def forward(x, context, *args, module=module, **kwargs):
            positive = type(module).forward(module, x, context, *args, **kwargs)
            negative = type(module).forward(module, x, -context, *args, **kwargs)
            return positive + weight * (positive - negative)
        model.add_object_patch(f"diffusion_model.blocks.{i}.cross_attn.forward", forward)
    return model


def rifle_x(model, factor):
    """KJNodes' RifleX for Wan: an object patch on the diffusion model's rope_embedder that changes the rotary
    embedding's temporal frequency (here: the frame positions scaled by `factor`)."""
    model = model.clone()
    embedder = model.get_model_object("diffusion_model.rope_embedder")

    class Scaled(torch.nn.Module):
        def forward(self, ids):
            return embedder(ids * torch.tensor([factor, 1.0, 1.0], dtype=ids.dtype, device=ids.device))
    model.add_object_patch("diffusion_model.rope_embedder", Scaled())
    return model


def compiled_frames(sample):
    """(result, frames torch.compile compiled) of `sample()`, from a fresh dynamo."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        return sample(), torch._dynamo.utils.counters["frames"]["total"]
    finally:
        torch._dynamo.reset()


def in_time(index, length):
    """A context window's frames in time: consecutive indices one step apart, across the end of a looped
    latent of `length` frames too (6, 7, 0, 1 of 8 are 6, 7, 8, 9)."""
    return [index[0] + sum((b - a) % length for a, b in zip(index[:j], index[1:j + 1])) for j in range(len(index))]


def warnings_of(caplog, text):
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]
