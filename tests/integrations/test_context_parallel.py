"""TAR under diffusers' context parallelism, in real multi-process runs (gloo on CPU, 2 and 4 processes).

tests/integrations/cp_worker.py runs every case of a suite in one process group (started once per suite);
the tests here compare each rank's results with single-process runs of the same tiny Wan and
LTX-Video models: TAR's output within 1e-5 (fp32) and its gradients, for Ulysses, ring and both,
split mid-frame (3 frames) and on frame boundaries (4 frames), two TAR configs, apply_tar before
and after enable_parallelism; the stock paths (strength 0, steps TAR leaves, remove_tar) bit for
bit against stock context parallelism.
"""

import contextlib
import functools
import os
import pathlib
import re
import subprocess
import sys

import PIL.Image
import pytest
import torch
from diffusers import ContextParallelConfig, ParallelConfig
from diffusers.models.attention_dispatch import AttentionBackendName

from vstar_kernels import TARConfig
from vstar_kernels.diffusers import apply_tar, capture_frame_attention
from vstar_kernels.diffusers.context_parallel import local_stock_call
from vstar_kernels.diffusers.dit import DiTTARProcessor

from . import cp_worker
from .cp_worker import FAMILIES, gradients, inputs, tar_config, two_calls

pytestmark = pytest.mark.long  # scheduled first (tests/conftest.py)

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """world -> each rank's results of that suite (run once per module, on first use)."""
    done = {}

    def get(world):
        if world not in done:
            done[world] = cp_worker.launch(world, tmp_path_factory.mktemp(f"cp{world}"))
        return done[world]

    return get


@functools.lru_cache(maxsize=None)
def single(family: str, frames: int, config) -> tuple:
    """Steps 0 and 1 of the single-process model (stock for config None)."""
    model = FAMILIES[family].model()
    if config is not None:
        apply_tar(model, tar_config(config, frames))
    return tuple(two_calls(model, family, frames))


def result(results, rank, name):
    got = results[rank][name]
    assert not (isinstance(got, tuple) and got and got[0] == "error"), f"rank {rank}, {name}: {got[1]}: {got[2]}"
    return got


def cases(prefix):
    return [(world, name) for world in cp_worker.SUITES for name in cp_worker.cases(world) if name.startswith(prefix)]


@pytest.mark.parametrize("world,name", cases("tar/"))
def test_tar_on_every_rank_equals_single_process_tar(runs, world, name):
    _, layout, family, config, order, frames = name.split("/")
    frames = int(frames)
    want, stock = single(family, frames, config), single(family, frames, None)
    assert (want[0] - stock[0]).abs().max() > 1e-3  # TAR moves the output, so that the comparison can fail
    results = runs(world)
    for rank in range(world):
        first, second = result(results, rank, name)
        torch.testing.assert_close(first, want[0], atol=1e-5, rtol=1e-5, msg=lambda m: f"rank {rank}: {m}")
        if config == "delta":  # until_step=0: the second call is stock context parallelism, bit for bit
            assert torch.equal(second, result(results, rank, f"stock/{layout}/{family}/{frames}"))
        else:
            torch.testing.assert_close(second, want[1], atol=1e-5, rtol=1e-5, msg=lambda m: f"rank {rank}: {m}")


@pytest.mark.parametrize("world,name", cases("stock/"))
def test_strength_0_and_remove_tar_are_stock_context_parallelism_bit_for_bit(runs, world, name):
    _, layout, family, frames = name.split("/")
    results = runs(world)
    for rank in range(world):
        stock = result(results, rank, name)
        torch.testing.assert_close(stock, single(family, int(frames), None)[0], atol=1e-5, rtol=1e-5)
        for kind in ("off", "removed"):
            assert torch.equal(result(results, rank, f"{kind}/{layout}/{family}/{frames}"), stock), (kind, rank)


@functools.lru_cache(maxsize=None)
def single_gradients(config):
    model = FAMILIES["wan"].model()
    if config is not None:
        apply_tar(model, tar_config(config, 3))
    return gradients(model, "wan", 3)


@pytest.mark.parametrize("world,name", cases("grad/"))
def test_gradients_summed_over_ranks_equal_single_process_gradients(runs, world, name):
    want, stock = single_gradients(name.split("/")[2]), single_gradients(None)
    assert (want["input"] - stock["input"]).abs().max() > 1e-3
    results = runs(world)
    for rank in range(world):
        got = result(results, rank, name)
        assert got.keys() == want.keys()
        for key, grad in want.items():
            scale = grad.abs().max().item()
            torch.testing.assert_close(got[key], grad, atol=1e-5 * max(scale, 1.0), rtol=1e-5,
                                       msg=lambda m: f"rank {rank}, d/d {key}: {m}")


def test_a_backend_the_stock_ring_needs_is_kept_for_the_calls_tar_leaves(runs):
    results = runs(2)
    want = single("wan", 3, "band")
    for rank in range(2):
        outs, kept = result(results, rank, "backend/ring/wan/3")
        for got, expected in zip(outs, want):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert kept == ["_native_flash"] * 2


def sent_bytes(layout: str, element: int = 4, accumulator: int = 4) -> list:
    """docs/multi-gpu.md's count of the bytes one rank sends in one attention call, for the traffic cases'
    call (batch 2, 2 heads of 12, 48 tokens): [stock forward, stock backward, TAR forward, TAR backward]."""
    ulysses, ring = (cp_worker.LAYOUTS[layout].get(f"{kind}_degree", 1) for kind in ("ulysses", "ring"))
    local = 2 * 2 * (48 // (ulysses * ring)) * 12 * element  # one of q, k, v: this rank's tokens, every head
    exchange = 4 * local * (ulysses - 1) / ulysses   # Ulysses: q, k, v there and the output back
    gather = 2 * local * (ring - 1)                  # ring: K and V to every other rank of the ring
    passed = 2 * local * ring * accumulator / element if ring > 1 else 0  # the stock ring's dK, dV, round the ring
    stock_backward = exchange + gather + passed  # and the stock ring gathers K and V again
    return [exchange + gather, stock_backward, exchange + gather, exchange + gather]


@pytest.mark.parametrize("world,name", cases("traffic/"))
def test_bytes_sent_per_attention_call_are_the_documented_counts(runs, world, name):
    want = sent_bytes(name.split("/")[1])
    results = runs(world)
    for rank in range(world):
        assert result(results, rank, name).tolist() == want, rank


ERRORS = {
    "error/uneven": r"blocks\.0\.attn1: under context parallelism \(ring_degree=2, ulysses_degree=1\) this rank holds "
                    r"1[34] tokens, and 2 equal shards of 1[34] are 2[68] tokens, not the call's 27 tokens "
                    r"\(3 frames x 9 tokens\): TAR needs even shards",
    "error/mask": r"blocks\.0\.attn1: TAR under context parallelism takes no attention mask; the processor passed a "
                  r"torch\.bool mask of shape \(1, 1, 1, 16\)",
    "error/text": r"transformer_blocks\.0\.attn1: TAR under context parallelism handles self-attention over video "
                  r"tokens only; this model's regularized attention joins text tokens \(before the video\)",
    "error/capture": r"blocks\.0\.attn1: capture_frame_attention records one process's attention calls; under "
                     r"diffusers' context parallelism each rank's call holds a share of the queries or heads",
    "error/capture-unrecorded": r"blocks\.0\.attn1: capture_frame_attention records one process's attention calls",
    "error/capture-late": r"blocks\.0\.attn1: capture_frame_attention records one process's attention calls",
    "error/dtype": r"blocks\.0\.attn1: key has dtype torch\.bfloat16 but query has torch\.float32: query, key and "
                   r"value must share one dtype",
    "error/heads": r"blocks\.0\.attn1: Ulysses with ulysses_degree=4 needs a head count it divides; the call has 2 "
                   r"heads",
    "error/mesh-degrees": r"blocks\.0\.attn1: the ContextParallelConfig's mesh has 2 ranks along its ring dimension "
                          r"and 1 along its Ulysses one, but the config says ring_degree=1, ulysses_degree=2",
    "error/mesh": r"blocks\.0\.attn1: under context parallelism \(ring_degree=2, ulysses_degree=2\) the members of a "
                  r"ring group hold different blocks of heads \(Ulysses ranks \[0, 1\]\)",
}


@pytest.mark.parametrize("world,name", cases("error/"))
def test_layouts_tar_cannot_run_exactly_raise_on_every_rank(runs, world, name):
    results = runs(world)
    for rank in range(world):
        got = results[rank][name]
        kind = "TypeError" if name == "error/dtype" else "ValueError"
        assert isinstance(got, tuple) and got[:2] == ("error", kind), (rank, got)
        assert re.match(ERRORS[name], got[2]), (rank, got[2])


def test_every_error_case_is_checked():
    assert sorted(ERRORS) == sorted(name for world in cp_worker.SUITES for name in cp_worker.cases(world)
                                    if name.startswith("error/"))


# --- single process ---------------------------------------------------------------------------------------------


def test_local_stock_call_restores_the_processor_exactly_also_when_the_call_raises():
    model = FAMILIES["wan"].model()
    stock = model.blocks[0].attn1.processor
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    stock._parallel_config = config
    assert "_attention_backend" not in vars(stock)
    with pytest.raises(KeyError), local_stock_call(stock):
        assert stock._parallel_config is None and stock._attention_backend.value == "native"
        raise KeyError("inside")
    assert stock._parallel_config is config and "_attention_backend" not in vars(stock)
    assert stock._attention_backend is None  # the class attribute again


@pytest.mark.parametrize("capture", [False, True], ids=["TAR's wrapper", "a capture's inside TAR's"])
def test_local_stock_call_through_wrappers_restores_the_stock_processor(capture):
    """Called with TAR's wrapper around the stock processor (with a capture's between them: the processor TAR
    wraps then), the attributes are swapped and put back on the stock processor, which holds them: the wrappers'
    forward them. Through a capture's they once stayed swapped after the capture's refusal under context
    parallelism, and every later stock call ran local attention."""
    model = FAMILIES["wan"].model()
    stock = model.blocks[0].attn1.processor
    stock._attention_backend = AttentionBackendName("_native_flash")  # (set_attention_backend sets a global too)
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    stock._parallel_config = config
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, blocks=[0]))
    with contextlib.ExitStack() as stack:
        if capture:
            stack.enter_context(capture_frame_attention(model, blocks=[0]))
        wrapper = model.blocks[0].attn1.processor.processor if capture else model.blocks[0].attn1.processor
        assert wrapper is not stock and wrapper._parallel_config is config
        with pytest.raises(KeyError), local_stock_call(wrapper):
            assert stock._parallel_config is None and stock._attention_backend.value == "native"
            raise KeyError("inside")
        assert stock._parallel_config is config and stock._attention_backend.value == "_native_flash"


@pytest.mark.parametrize("config,error,match", [
    ("not a config", TypeError, r"the processor's parallel config is 'not a config'; TAR runs under diffusers' "
                                r"ParallelConfig with a ContextParallelConfig"),
    (ParallelConfig(), TypeError, r"the processor's parallel config is ParallelConfig\(context_parallel_config=None"),
    (ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2)), ValueError,
     r"the processor's ContextParallelConfig is not set up \(no device mesh\)"),
])
def test_parallel_configs_tar_cannot_read_raise(config, error, match):
    model = FAMILIES["wan"].model()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, blocks=[0]))
    processor = model.blocks[0].attn1.processor
    assert isinstance(processor, DiTTARProcessor)
    processor._parallel_config = config  # what enable_parallelism sets, through the wrapper
    assert processor.processor._parallel_config is config
    with pytest.raises(error, match=r"blocks\.0\.attn1: " + match), torch.no_grad():
        model(**inputs("wan", 3), return_dict=False)


def test_the_docs_torchrun_example_runs_as_written_on_cpu_with_gloo(tmp_path):
    page = (ROOT / "docs" / "multi-gpu.md").read_text(encoding="utf-8")
    script = tmp_path / "wan_tar_multi_gpu.py"
    script.write_text(re.findall(r"```python\n(.*?)```", page, flags=re.S)[0], encoding="utf-8")
    model = tmp_path / "tiny-wan"
    cp_worker.save_tiny_wan_pipeline(model)
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                       OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "tests.integrations.cp_worker", str(script), str(model), "32", "32", "9", "2"],
                         cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=cp_worker.RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    frames = PIL.Image.open(tmp_path / "fox_two_gpus.gif")
    assert frames.size == (32, 32) and frames.n_frames == 9
