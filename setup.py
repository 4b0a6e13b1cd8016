"""Install vstar_kernels. Pure Python by default.

VSTAR_BUILD_CUDA=1 adds the optional CUDA C++ operator (bindings/ -> vstar_kernels._C). It
compiles against the installed torch, so build it without build isolation:

    VSTAR_BUILD_CUDA=1 pip install -e . --no-build-isolation

GPU architectures come from TORCH_CUDA_ARCH_LIST, default "8.0;9.0" (never probed from the
machine's GPU). A plain install never imports torch here and never looks at the hardware.
"""

import os

from setuptools import find_packages, setup

EXTRAS = {
    # accelerate: diffusers loads a pipeline's transformer (from_pretrained) through it
    "diffusers": ["diffusers>=0.30", "transformers>=4.40", "accelerate>=0.26"],
    "bench": ["matplotlib>=3.7", "tqdm>=4.60", "pytest-benchmark>=4.0"],
    "plot": ["matplotlib>=3.7"],
}
# setuptools: tests/cli/test_wheel.py builds the wheel without build isolation (bdist_wheel is built in from 70.1)
EXTRAS["test"] = sorted({"pytest>=7", "pytest-xdist>=3.6", "hypothesis>=6", "setuptools>=70.1", *EXTRAS["diffusers"],
                         *EXTRAS["bench"], *EXTRAS["plot"]})


def cuda_extension():
    """(ext_modules, cmdclass) for the CUDA operator; only called when VSTAR_BUILD_CUDA=1."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        raise SystemExit(
            "VSTAR_BUILD_CUDA=1 compiles against the installed torch, which this build cannot import "
            f"({exc}). Install torch first, then: VSTAR_BUILD_CUDA=1 pip install -e . --no-build-isolation"
        ) from exc
    import torch

    if torch.version.cuda is None:
        raise SystemExit(f"VSTAR_BUILD_CUDA=1 needs a CUDA build of torch; the installed torch {torch.__version__} "
                         "has no CUDA support")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        "vstar_kernels._C",
        sources=["bindings/tar_op.cpp", "bindings/tar_kernel.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [ext], {"build_ext": BuildExtension}


def build_cuda() -> bool:
    """VSTAR_BUILD_CUDA: 1 / on / true / yes build the extension, unset, empty, 0 / off / false / no do not; any
    other value is an error (it would have installed no extension without a word)."""
    value = os.environ.get("VSTAR_BUILD_CUDA", "").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("", "0", "off", "false", "no"):
        return False
    raise SystemExit(f"VSTAR_BUILD_CUDA={os.environ['VSTAR_BUILD_CUDA']!r}: set it to 1 to build the CUDA "
                     "extension, 0 (or leave it unset) not to")


ext_modules, cmdclass = cuda_extension() if build_cuda() else ([], {})

setup(
    name="vstar_kernels",
    version="0.1.0",
    description="Fused kernels for VSTAR's temporal attention regularization (TAR) in video diffusion",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vstar_kernels", "vstar_kernels.*"]),
    package_data={"vstar_kernels": ["data/*.json"]},
    python_requires=">=3.9",
    # A range the local CPU build (torch 2.13.0) satisfies: never pin a CUDA build here.
    # numpy: the Triton interpreter and matplotlib need it, and a torch wheel does not bring it.
    # triton: the Triton backend needs 3.7 or later (vstar_kernels/ops/_load.py MIN_TRITON: 3.6 rejects the kernels),
    # but a CUDA torch pins its own Triton (torch 2.11's is 3.6), and a higher floor here would make pip replace the
    # user's torch: an older Triton is that backend's named reason instead (`info`, BackendUnavailableError).
    install_requires=["torch>=2.4", "numpy", "triton>=3.0; platform_system == 'Linux'"],
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["vstar-kernels=vstar_kernels.cli:main"]},
)
