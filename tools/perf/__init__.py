"""The maintainers' performance yardstick (not shipped with the package): run from a source checkout.

    python -m tools.perf static   [--arch 80 90] [--quick]   compiled-code statistics (SASS) per kernel config
    python -m tools.perf traffic  [--quick]                  bytes and MMA FLOPs counted in the Triton interpreter
    python -m tools.perf model    [--gpu h100 h200] [--dit]  the roofline model, calibrated on published bars
    python -m tools.perf compile-check [--arch 90]           every launch compiled for an NVIDIA arch, no GPU

Modules: static (SASS statistics) and baseline (the plain-attention loop they compare with),
traffic (interpreter counts), compile_check (ahead-of-time compiles as the JIT specializes),
roofline (GPU peaks, loop costs, the roofline of one launch, the FlashAttention calibration),
eager (eager peers counted on meta tensors), model (the kernel-shape sweep and its files),
model_dit (the video DiT rows). benchmarks/NOTES.md and tools/perf/README.md say what each
number means. Results go to benchmarks/results/ unless --out says otherwise.
"""

from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
