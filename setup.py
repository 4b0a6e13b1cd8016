"""Install vstar_kernels. Pure Python by default; the optional CUDA extension is added by issue-7 work."""

from setuptools import find_packages, setup

EXTRAS = {
    "diffusers": ["diffusers>=0.30", "transformers>=4.40"],
    "bench": ["matplotlib>=3.7", "tqdm>=4.60", "pytest-benchmark>=4.0"],
    "plot": ["matplotlib>=3.7"],
}
EXTRAS["test"] = sorted({"pytest>=7", "hypothesis>=6", *EXTRAS["diffusers"], *EXTRAS["bench"], *EXTRAS["plot"]})

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
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux'"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["vstar-kernels=vstar_kernels.cli:main"]},
)
