"""The multi-process half of test_context_parallel.py: cases that run in every process of a gloo group.

`launch(world, suite, directory)` starts `world` processes (torch.multiprocessing, forkserver) that
meet through a file store in `directory`, run the suite's cases in order and save their results
to ``directory/rank{r}.pt``: case name -> a tensor, a list of tensors, or ("error", type name,
message) for a case that raised. One process group serves every case of a suite (starting one
costs seconds); every collective and the whole run are bounded in time. The same builders make
the single-process expectations in the test process.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import multiprocessing
import os
import pathlib
import runpy
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
from diffusers import ContextParallelConfig, ParallelConfig
from diffusers.models import attention_dispatch
from torch.distributed.device_mesh import DeviceMesh

from vstar_kernels import TARConfig
from vstar_kernels.diffusers import apply_tar, capture_frame_attention, remove_tar
from vstar_kernels.diffusers.context_parallel import ContextParallelTAR
from vstar_kernels.frames import TokenLayout

from .. import _device  # noqa: F401 (the interpreter as the test process runs it, its shim included)
from .tiny_dit_models import BATCH, FAMILIES, NEWER, randn

# ChronoEdit's edit call: 2 latent frames at rotary positions 0 and 4 (a token layout of runs, not a grid)
FAMILIES = {**FAMILIES, "chronoedit": NEWER["chronoedit"], "minimax": NEWER["minimax"]}

COLLECTIVE_TIMEOUT_S = 120   # one collective waiting for a rank that raised, or hangs
RUN_TIMEOUT_S = 540          # the whole suite
FRAMES = (3, 4)   # 48 and 64 tokens: 2 and 4 shards split a frame (3 frames) or fall on frame boundaries (4)
LAYOUTS = {
    "ulysses": dict(ulysses_degree=2),
    "ring": dict(ring_degree=2),
    "unified": dict(ulysses_degree=2, ring_degree=2),
    # a device mesh of its own, [[0, 2], [1, 3]] as (ring, ulysses): the Ulysses groups hold shards 0 and 2, 1 and 3
    "strided": dict(ulysses_degree=2, ring_degree=2, mesh=[[0, 2], [1, 3]]),
}
CONFIGS = ("band", "delta")
ORDERS = ("before", "after")   # apply_tar before or after enable_parallelism
FULL = (CONFIGS, ORDERS, FRAMES)
# world -> layout -> the (configs, orders, frames) its TAR cases run
SUITES = {2: {"ulysses": FULL, "ring": FULL}, 4: {"unified": FULL, "strided": (("band",), ("after",), (3,))}}


def inputs(family: str, frames: int) -> dict:
    """One forward call's inputs: batch 2, 16 tokens per frame, 8 text tokens (an even split for 2 and 4 ranks)."""
    if family == "minimax":  # one packed sequence: text and audio rows (frame -1), then 3 frames of 4 video rows
        assert frames == 3, frames
        return FAMILIES["minimax"].inputs()
    text = randn(BATCH, 8, 16, seed=2)
    if family in ("wan", "chronoedit"):
        return dict(hidden_states=randn(BATCH, 4, frames, 8, 8, seed=1), timestep=torch.tensor([700, 700]),
                    encoder_hidden_states=text)
    # no text mask: diffusers' Ulysses splits the heads of q, k, v but not of LTX's per-head mask (a stock failure)
    return dict(hidden_states=randn(BATCH, frames * 16, 4, seed=1), timestep=torch.tensor([700, 700]),
                encoder_hidden_states=text, encoder_attention_mask=None, num_frames=frames, height=4, width=4)


def tar_config(name: str, frames: int) -> TARConfig:
    """band: sigma 1 in every block and step (band-triton: on the Triton kernels); delta: an (F, F) frame matrix
    in block 1 at step 0 only, on the Triton kernels (the interpreter on a CPU)."""
    if name in ("band", "band-triton"):
        return TARConfig(levels={0: (1.0, 1.0)}, until_step=None, backend="triton" if name == "band-triton" else "auto")
    if name == "delta":
        return TARConfig(levels={0: (randn(frames, frames, seed=5).abs(), 0.8)}, until_step=0, blocks=[1],
                         backend="triton")
    if name == "off":
        return TARConfig(levels={0: (1.0, 0.0)}, until_step=None)
    raise ValueError(name)


def forward(model, kwargs) -> torch.Tensor:
    return model(**kwargs, return_dict=False)[0]


def two_calls(model, family: str, frames: int) -> List[torch.Tensor]:
    """Steps 0 and 1 of a bare model (each forward call is one step)."""
    with torch.no_grad():
        return [forward(model, inputs(family, frames)) for _ in range(2)]


def loss_weights(shape) -> torch.Tensor:
    return randn(*shape, seed=9)


def gradients(model, family: str, frames: int) -> Dict[str, torch.Tensor]:
    """d(loss)/d(input latent) and d(loss)/d(every parameter) of one regularized call."""
    kwargs = inputs(family, frames)
    kwargs["hidden_states"].requires_grad_(True)
    out = forward(model, kwargs)
    (out * loss_weights(out.shape)).sum().backward()
    grads = {"input": kwargs["hidden_states"].grad}
    grads.update({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    return grads


ERRORS = {
    2: ["error/uneven", "error/mask", "error/text", "error/capture", "error/capture-unrecorded", "error/capture-late",
        "error/dtype", "error/mesh-degrees"],
    4: ["error/heads", "error/mesh"],
}


# --- in the worker processes --------------------------------------------------------------------------------------


def _lse_forward_op(stock_op: Callable):
    """The native forward op, able to return the log-sum-exp for diffusers' stock ring attention.

    CPU stand-in, in the test harness only: the stock ring asks its backend for each chunk's
    lse, which the native op refuses and the lse-returning backends (flash, cuDNN, Sage) do not
    run on a CPU. TAR's own path never uses it; it is here for the stock calls TAR leaves alone.
    Its backward (the native op's) ignores the ring's per-chunk keys: the stock ring's backward
    is run for its communication only (`traffic`), its gradients never compared.
    """

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        out = stock_op(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False, _save_ctx,
                       _parallel_config)
        if not return_lse:
            return out
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                           attn_mask=attn_mask, scale=scale)
        return out, lse.permute(0, 2, 1)

    return forward_op


class _Traffic:
    """Counts the bytes this rank sends through the collectives of diffusers' and TAR's attention."""

    def __init__(self):
        self.sent = 0
        self.saved = []

    def _wrap(self, module, name: str, sent: Callable[[torch.Tensor, dict, int, int], float]):
        """Count `sent(tensor, arguments, group size, group rank)` bytes for each call of module.name."""
        stock = getattr(module, name)
        signature = inspect.signature(stock)
        self.saved.append((module, name, stock))

        def counted(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            tensor = arguments["tensor" if "tensor" in arguments else "input" if "input" in arguments else "self"]
            group = arguments.get("group")
            self.sent += round(sent(tensor, arguments, dist.get_world_size(group), dist.get_rank(group)))
            return stock(*args, **kwargs)

        setattr(module, name, counted)

    def __enter__(self):
        def nbytes(x):
            return x.numel() * x.element_size()

        def gathered(x, arguments, size, rank):  # to every other rank
            return nbytes(x) * (size - 1)

        def exchanged(x, arguments, size, rank):  # every row block but its own (funcol's permute is one of these)
            splits = arguments.get("input_split_sizes")
            return nbytes(x) * ((size - 1) / size if splits is None else 1 - splits[rank] / x.shape[0])

        self._wrap(dist, "all_gather", gathered)
        self._wrap(dist, "all_to_all_single", exchanged)
        self._wrap(funcol, "all_gather_tensor", gathered)
        self._wrap(funcol, "all_to_all_single", exchanged)
        return self

    def __exit__(self, *exc):
        for module, name, stock in reversed(self.saved):
            setattr(module, name, stock)


def _traffic(layout: str) -> torch.Tensor:
    """Bytes this rank sends for one call of blocks.0.attn1 over 3 frames of 16 tokens, forward and backward:
    (stock forward, stock backward, TAR forward, TAR backward)."""
    model = _model("wan", layout)
    attn = model.blocks[0].attn1
    shards = LAYOUTS[layout].get("ring_degree", 1) * LAYOUTS[layout].get("ulysses_degree", 1)
    x = randn(BATCH, 48 // shards, attn.inner_dim, seed=3).requires_grad_(True)

    def count():
        with _Traffic() as traffic:
            out = attn(x)
            forward = traffic.sent
            out.sum().backward()
        return [forward, traffic.sent - forward]

    stock = count()
    apply_tar(model, tar_config("band", 3))
    model._vstar_tar.grid = (3, 16)  # as if inside a forward call over 3 frames of 16 tokens
    attn(x)  # the first call exchanges the shard order, once per config
    return torch.tensor(stock + count())


def _enable(model, layout: str, **options):
    options = {**LAYOUTS[layout], **options}
    if "mesh" in options:
        options["mesh"] = DeviceMesh("cpu", options["mesh"], mesh_dim_names=("ring", "ulysses"))
    model.enable_parallelism(config=ParallelConfig(context_parallel_config=ContextParallelConfig(**options)))
    return model


def _model(family: str, layout: str, config=None, order="after", **options):
    model = FAMILIES[family].model()
    if config is not None and order == "before":
        apply_tar(model, config)
    _enable(model, layout, **options)
    if config is not None and order == "after":
        apply_tar(model, config)
    return model


def _reduced(grads: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Each rank's gradients are its tokens' share: their sum over the ranks is the whole gradient."""
    for grad in grads.values():
        dist.all_reduce(grad)
    return grads


def _error_cases(world: int) -> Dict[str, Callable]:
    def uneven():  # 3 frames of 3 x 3 tokens: 27 tokens, shards of 14 and 13
        model = _model("wan", "ring", TARConfig(levels={0: (1.0, 1.0)}), ring_anything=True)
        kwargs = dict(inputs("wan", 3), hidden_states=randn(BATCH, 4, 3, 6, 6, seed=1))
        with torch.no_grad():
            return forward(model, kwargs)

    def mask():  # a processor that passes a mask under context parallelism
        model = _model("wan", "ring", TARConfig(levels={0: (1.0, 1.0)}))
        model._vstar_tar.grid = (2, 16)  # as if inside a forward call over 2 frames of 16 tokens
        attn = model.blocks[0].attn1
        with torch.no_grad():
            return attn(randn(1, 16, attn.inner_dim, seed=3), attention_mask=torch.ones(1, 1, 1, 16, dtype=torch.bool))

    def text():  # CogVideoX joins text tokens to the video in its regularized attention
        model = FAMILIES["cogvideox"].model()
        apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}))
        model.enable_parallelism(config=ContextParallelConfig(ring_degree=2), cp_plan={})
        with torch.no_grad():
            return forward(model, FAMILIES["cogvideox"].inputs())

    def capture():  # under Ulysses the call held every query, for half the heads
        model = _model("wan", "ulysses")
        with torch.no_grad(), capture_frame_attention(model, blocks=[0]):
            return forward(model, inputs("wan", 3))

    def capture_unrecorded():  # TAR on and a capture open, at a call it does not record (step 0)
        model = _model("wan", "ulysses", TARConfig(levels={0: (1.0, 2.0)}, until_step=None))
        with torch.no_grad(), capture_frame_attention(model, steps=[1], blocks=[0]):
            return forward(model, inputs("wan", 3))

    def capture_late():  # the model made parallel while a capture is open: diffusers skips the capture's wrapper
        model = FAMILIES["wan"].model()
        with torch.no_grad(), capture_frame_attention(model, blocks=[0]):
            _enable(model, "ring")
            return forward(model, inputs("wan", 3))

    def dtype():  # a processor of one's own passing a bfloat16 key: one exchange of q, k and v would promote it
        model = _model("wan", "ulysses", TARConfig(levels={0: (1.0, 1.0)}))
        processor = model.blocks[0].attn1.processor
        parallel = ContextParallelTAR.of(processor.processor, "none", processor.name)
        q, k, v = (randn(BATCH, 2, 8, 12, seed=seed) for seed in (1, 2, 3))
        return parallel.attention(q, k.bfloat16(), v, None, False, TokenLayout(2, 8), lambda *args, **kw: None)

    def heads():  # 2 heads, ulysses_degree 4 (ulysses_anything pads the heads for the stock path)
        model = FAMILIES["wan"].model()
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=4, ulysses_anything=True))
        apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}))
        with torch.no_grad():
            return forward(model, inputs("wan", 4))

    def mesh():  # [[2, 0], [1, 3]]: ranks 1 and 2 form a ring group, but rank 1 is first in its Ulysses group [1, 3]
        model = _model("wan", "unified", TARConfig(levels={0: (1.0, 1.0)}), mesh=[[2, 0], [1, 3]])
        with torch.no_grad():
            return forward(model, inputs("wan", 4))

    def mesh_degrees():  # a mesh of 2 ring ranks, the config's ulysses_degree=2 (diffusers runs it as it can)
        model = _model("wan", "ulysses", TARConfig(levels={0: (1.0, 1.0)}), mesh=[[0], [1]])
        with torch.no_grad():
            return forward(model, inputs("wan", 4))

    cases = {"error/uneven": uneven, "error/mesh-degrees": mesh_degrees, "error/mask": mask, "error/text": text,
             "error/capture": capture, "error/capture-unrecorded": capture_unrecorded,
             "error/capture-late": capture_late,
             "error/heads": heads, "error/mesh": mesh, "error/dtype": dtype}
    return {name: cases[name] for name in ERRORS[world]}


def _stock(family: str, layout: str, frames: int) -> torch.Tensor:
    return two_calls(_model(family, layout), family, frames)[0]


def _tar(family: str, layout: str, config: str, order: str, frames: int) -> List[torch.Tensor]:
    return two_calls(_model(family, layout, tar_config(config, frames), order), family, frames)


def _removed(family: str, layout: str, frames: int) -> torch.Tensor:
    model = _model(family, layout, tar_config("band", frames))
    two_calls(model, family, frames)
    remove_tar(model)
    return two_calls(model, family, frames)[0]


def _off(family: str, layout: str, frames: int) -> torch.Tensor:
    return two_calls(_model(family, layout, tar_config("off", frames)), family, frames)[0]


def _grad(layout: str, config: str) -> Dict[str, torch.Tensor]:
    return _reduced(gradients(_model("wan", layout, tar_config(config, 3)), "wan", 3))


def _any_backend():
    """Ring with a backend whose stock op cannot run here: every regularized call is TAR's own, on
    the native op for that call only; the processors keep the backend the user set."""
    model = FAMILIES["wan"].model()
    model.set_attention_backend("_native_flash")
    _enable(model, "ring")
    apply_tar(model, tar_config("band", 3))
    outs = two_calls(model, "wan", 3)
    kept = [block.attn1.processor.processor._attention_backend.value for block in model.blocks]
    return outs, kept


def cases(world: int) -> Dict[str, Callable]:
    cases: Dict[str, Callable] = {}
    for layout, (configs, orders, frame_counts) in SUITES[world].items():
        for family in ("wan", "ltx"):
            for frames in frame_counts:
                cases[f"stock/{layout}/{family}/{frames}"] = functools.partial(_stock, family, layout, frames)
            for config in configs:
                for order in orders:
                    for frames in frame_counts:
                        cases[f"tar/{layout}/{family}/{config}/{order}/{frames}"] = functools.partial(
                            _tar, family, layout, config, order, frames)
            for kind, run in (("removed", _removed), ("off", _off)):
                for frames in frame_counts:
                    cases[f"{kind}/{layout}/{family}/{frames}"] = functools.partial(run, family, layout, frames)
        for config in ("band", "band-triton") if layout == "ring" else ("band",):
            cases[f"grad/{layout}/{config}"] = functools.partial(_grad, layout, config)
        if "mesh" not in LAYOUTS[layout]:
            cases[f"traffic/{layout}"] = functools.partial(_traffic, layout)
    cases.update(_error_cases(world))
    if world == 2:
        for layout in ("ulysses", "ring"):  # frame ids from the layout's runs (ChronoEdit's frames 0 and 4)
            for kind, run in (("stock", _stock), ("removed", _removed), ("off", _off)):
                cases[f"{kind}/{layout}/chronoedit/2"] = functools.partial(run, "chronoedit", layout, 2)
            cases[f"tar/{layout}/chronoedit/band/after/2"] = functools.partial(
                _tar, "chronoedit", layout, "band", "after", 2)
            # text and audio rows joined to the video, each frame -1 (MiniMax-H3's packed sequence)
            for kind, run in (("stock", _stock), ("removed", _removed), ("off", _off)):
                cases[f"{kind}/{layout}/minimax/3"] = functools.partial(run, "minimax", layout, 3)
            cases[f"tar/{layout}/minimax/band/after/3"] = functools.partial(_tar, "minimax", layout, "band", "after", 3)
        cases["backend/ring/wan/3"] = _any_backend
    return cases


def _cpu_device_count() -> None:
    # diffusers' enable_parallelism picks the device rank % torch.accelerator.device_count(), which is
    # 0 on a CPU: these CPU processes say 1 (the CPU)
    torch.accelerator.device_count = lambda: 1


def _run(rank: int, world: int, directory: str) -> None:
    _cpu_device_count()
    attention_dispatch._native_attention_forward_op = _lse_forward_op(attention_dispatch._native_attention_forward_op)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = {}
    try:
        for name, case in cases(world).items():
            try:
                results[name] = case()
            except Exception as exc:  # recorded: the test process checks which cases raise, and what
                results[name] = ("error", type(exc).__name__, str(exc))
    finally:
        torch.save(results, os.path.join(directory, f"rank{rank}.pt"))
        dist.destroy_process_group()


def launch(world: int, directory: pathlib.Path, timeout: float = RUN_TIMEOUT_S) -> List[dict]:
    """Runs the suite for `world` processes; returns each rank's results, or raises (a failed or late process)."""
    # forked from one server that imported this module (torch, diffusers, vstar_kernels) once for both suites:
    # each spawned process imported them itself, and 4 at once on 2 cores took most of a suite's time
    multiprocessing.set_forkserver_preload([__name__])
    context = mp.start_processes(_run, args=(world, str(directory)), nprocs=world, join=False,
                                 start_method="forkserver")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the {world}-process run did not finish in {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(directory / f"rank{rank}.pt", weights_only=True) for rank in range(world)]


def save_tiny_wan_pipeline(directory: pathlib.Path) -> None:
    """A WanPipeline of tiny random-weight parts saved to `directory`: a word-level tokenizer, a one-layer
    UMT5 encoder, a Wan VAE of 8 base channels (4 latent channels) and the tiny Wan transformer."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = ["<pad>", "</s>", "<unk>", *"a red fox running through fresh snow".split()]
    vocabulary = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    vocabulary.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocabulary, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=512)
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                transformer=FAMILIES["wan"].model()).save_pretrained(directory)


if __name__ == "__main__":
    # python -m tests.integrations.cp_worker SCRIPT [ARGS...], one process of a torchrun: SCRIPT as __main__, on a CPU
    _cpu_device_count()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
