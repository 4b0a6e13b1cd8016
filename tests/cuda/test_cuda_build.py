"""The optional CUDA C++ operator builds: its sources compile with the machine's tools.

No GPU needed. The kernels (bindings/tar_kernel.cu, no torch dependency) go through
nvcc for the default architectures; the TORCH_LIBRARY glue (bindings/tar_op.cpp)
through the host compiler against the installed torch's headers; both objects must
agree on the launcher's symbols. CMake and setup.py must stay opt-in.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from .cuda_toolchain import BINDINGS, compile_or_fail, cuda_home, cxx_path, nvcc_path, torch_include_dirs

ROOT = BINDINGS.parent
needs_nvcc = pytest.mark.skipif(nvcc_path() is None or cuda_home() is None,
                                reason="nvcc or the CUDA headers are not installed: the CUDA sources cannot be "
                                       "compiled")


def defined_and_undefined(obj):
    """(defined, undefined) demangled vstar:: symbols of an object file."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    lines = subprocess.run([nm, "-C", str(obj)], capture_output=True, text=True, check=True).stdout.splitlines()
    defined, undefined = set(), set()
    for line in lines:
        parts = line.split(None, 2) if not line.startswith(" ") else ["", *line.split(None, 1)]
        kind, name = parts[-2], parts[-1]
        if name.startswith("vstar::"):
            (undefined if kind == "U" else defined).add(name)
    return defined, undefined


@pytest.fixture(scope="module")
def kernel_build(tmp_path_factory):
    """bindings/tar_kernel.cu compiled by nvcc for sm_80 and sm_90: (object file, nvcc's stderr)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what the setup.py build adds

    obj = tmp_path_factory.mktemp("nvcc") / "tar_kernel.o"
    res = compile_or_fail(
        [nvcc_path(), "-std=c++17", "-O3", *COMMON_NVCC_FLAGS, "--Werror", "all-warnings", "-Xptxas", "-v",
         "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
         "-c", str(BINDINGS / "tar_kernel.cu"), "-o", str(obj)],
        "nvcc on bindings/tar_kernel.cu")
    return obj, res.stderr


@needs_nvcc
def test_kernels_compile_with_nvcc_for_the_default_archs(kernel_build):
    obj, log = kernel_build
    # One kernel per (input dtype, delta dtype) pair and arch, none of them spilling registers.
    assert len(re.findall(r"Compiling entry function '\S*tar_fwd_kernel\S*' for 'sm_[89]0'", log)) == 2 * 5
    assert "bytes spill" in log and not re.search(r"[1-9]\d* bytes spill", log)
    defined, _ = defined_and_undefined(obj)
    assert any(name.startswith("vstar::launch_tar_forward(") for name in defined)


@needs_nvcc
@pytest.mark.skipif(cxx_path() is None, reason="no host C++ compiler")
@pytest.mark.skipif(torch_include_dirs() is None, reason="the installed torch ships no C++ headers")
def test_torch_glue_compiles_against_torch_headers(tmp_path, kernel_build):
    includes = torch_include_dirs()
    flags = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    if not (includes[0] / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        # A CPU build of torch lacks this generated header; it only sets Windows export macros.
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    obj = tmp_path / "tar_op.o"
    compile_or_fail(
        [cxx_path(), "-std=c++20", "-O0", "-fPIC", "-Wall", "-Wextra", "-Werror", *flags,
         *(f for d in includes for f in ("-isystem", str(d))), "-isystem", str(cuda_home() / "include"),
         "-c", str(BINDINGS / "tar_op.cpp"), "-o", str(obj)],
        "the host compiler on bindings/tar_op.cpp")
    _, needed = defined_and_undefined(obj)
    provided, _ = defined_and_undefined(kernel_build[0])
    assert needed == {"vstar::launch_tar_forward(vstar::TarParams const&, vstar::TarPlan const&, void*, void*)",
                      "vstar::error_string(int)"}
    assert needed <= provided


def cmake(tmp_path, *args, env=None):
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), *args], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_nothing_unless_asked(tmp_path):
    res = cmake(tmp_path)
    assert res.returncode == 0, res.stderr
    assert "VSTAR_BUILD_CUDA is OFF, nothing to build" in res.stdout


@needs_nvcc
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_takes_archs_from_torch_cuda_arch_list(tmp_path):
    res = cmake(tmp_path, "-DVSTAR_BUILD_CUDA=ON", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                f"-DCMAKE_CUDA_COMPILER={nvcc_path()}", env={"TORCH_CUDA_ARCH_LIST": "8.6 9.0a+PTX"})
    assert "vstar: CUDA architectures 86-real;90a-real;90a-virtual" in res.stdout
    default = cmake(tmp_path / "default", "-DVSTAR_BUILD_CUDA=ON", env={"TORCH_CUDA_ARCH_LIST": None})
    assert "vstar: CUDA architectures 80-real;90-real" in default.stdout
    if torch.version.cuda is None:
        assert res.returncode != 0
        assert "needs a CUDA build of PyTorch" in res.stderr
    elif "cannot find the CUDA" in res.stderr:  # nvcc without the toolkit's libraries beside it
        pytest.skip("torch's CMake config cannot find the CUDA libraries here, so the configure cannot finish")
    else:
        assert res.returncode == 0, res.stderr


def run_setup(*args, env, block_torch):
    code = ("import sys, runpy\n"
            + ("sys.modules['torch'] = None\n" if block_torch else "")
            + f"sys.argv = ['setup.py', *{list(args)!r}]\n"
            "runpy.run_path('setup.py', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in {**os.environ, **env}.items() if v is not None})


@pytest.mark.parametrize("value", [None, "", "0", "off", "False"])
def test_plain_install_is_pure_python_and_never_imports_torch(value):
    res = run_setup("--name", env={"VSTAR_BUILD_CUDA": value}, block_torch=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "vstar_kernels"


@pytest.mark.parametrize("value", ["1", "ON", "true", "yes"])
def test_cuda_build_without_torch_explains_build_isolation(value):
    """Each spelling that asks for the build builds (CMake's option is spelled ON)."""
    res = run_setup("--name", env={"VSTAR_BUILD_CUDA": value}, block_torch=True)
    assert res.returncode != 0
    assert "--no-build-isolation" in res.stderr


def test_a_build_switch_neither_on_nor_off_is_an_error():
    """It installed no extension without a word."""
    res = run_setup("--name", env={"VSTAR_BUILD_CUDA": "cuda"}, block_torch=True)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1] == ("VSTAR_BUILD_CUDA='cuda': set it to 1 to build the CUDA extension, "
                                                   "0 (or leave it unset) not to")


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the message of a CPU build of torch")
def test_cuda_build_with_cpu_torch_says_so():
    res = run_setup("--name", env={"VSTAR_BUILD_CUDA": "1"}, block_torch=False)
    assert res.returncode != 0
    assert "needs a CUDA build of torch" in res.stderr
