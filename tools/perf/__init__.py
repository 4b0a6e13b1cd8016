"""The maintainers' performance yardstick (not shipped with the package): run from a source checkout.

    python -m tools.perf static   [--arch 80 90] [--quick]   compiled-code statistics (SASS) per kernel config
    python -m tools.perf traffic  [--quick]                  bytes and MMA FLOPs counted in the Triton interpreter
    python -m tools.perf model    [--gpu h100 h200] [--dit]  the roofline model, calibrated on published bars
    python -m tools.perf model --quick --out DIR             the same, each autotuned launch in two configs
    python -m tools.perf compile-check [--arch 90]           every launch compiled for an NVIDIA arch, no GPU
    python -m tools.perf cpu      [--quick --out DIR]        the CPU default path against plain SDPA (measured)
    python -m tools.perf host                                the host time of one small call (measured)

Modules: static (SASS statistics) and baseline (the plain-attention loop they compare with, in the
structure of Triton's fused-attention tutorial), traffic (interpreter counts), compile_check
(ahead-of-time compiles as the JIT specializes), roofline (GPU peaks, each modeled launch compiled
as it specializes, the roofline of one launch, the FlashAttention-2 and FlashAttention-3
calibrations and the tutorial anchor), eager (eager peers counted on meta tensors), model (the
kernel-shape sweep and its files), model_dit (the video DiT rows), cpu (the CPU default path
timed), host (the per-call host time on the quick shape). tools/perf/model.md says what each number
means. Results go to benchmarks/results/ unless --out says otherwise (host prints its table and
writes no file). `python -m tools.perf COMMAND --help` gives each command's options and defaults.
"""

from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
