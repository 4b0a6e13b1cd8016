"""Backend choice: explicit backends fail loudly with reasons; only "auto" falls back."""

import os
import subprocess
import sys

import pytest
import torch

import vstar_kernels as vk
from vstar_kernels import dispatch
from vstar_kernels._problem import make_problem


def problem(q, **kw):
    opts = dict(sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None)
    opts.update(kw)
    return make_problem(q, q, q, **opts)


def test_auto_uses_the_cpu_backend_for_cpu_tensors():
    assert dispatch.select(problem(torch.randn(1, 1, 8, 8)), "auto").name == "cpu"
    assert dispatch.select(problem(torch.randn(1, 1, 8, 8, dtype=torch.float64), causal=True), "auto").name == "cpu"


def test_the_cpu_backend_is_named_with_its_reasons(capsys):
    """`info` names the CPU backend; on other devices it says why not, and "auto" takes the reference."""
    from vstar_kernels import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend cpu         on cpu    : available" in out
    lines = [line for line in out.splitlines() if line.startswith("backend ")]
    assert len(lines) == 5 and len({line.index(" on ") for line in lines}) == 1, lines  # one column of names
    meta = problem(torch.empty(1, 1, 8, 8, device="meta"))
    with pytest.raises(vk.BackendUnavailableError, match="backend='cpu' cannot run this call: the CPU backend runs "
                                                         "on CPU tensors, got meta tensors"):
        dispatch.select(meta, "cpu")
    assert dispatch.select(meta, "auto").name == "reference"
    with pytest.raises(vk.BackendUnavailableError, match="backend='triton' cannot run this call: the Triton backend "
                                                         "runs on CPU or CUDA tensors, got meta tensors"):
        dispatch.select(meta, "triton")  # was "the Triton kernels runs"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter")
def test_triton_runs_cpu_tensors_under_the_interpreter():
    assert dispatch.select(problem(torch.randn(1, 1, 8, 8)), "triton").name == "triton"


def test_triton_rejects_float64_with_reason():
    with pytest.raises(vk.BackendUnavailableError, match="backend='triton' cannot run this call: .*float64"):
        vk.tar_attention(*(torch.randn(1, 1, 8, 8, dtype=torch.float64) for _ in range(3)), backend="triton")


def test_triton_rejects_too_wide_head_dim():
    with pytest.raises(vk.BackendUnavailableError, match="head dim 320 > 256"):
        vk.tar_attention(*(torch.randn(1, 1, 8, 320) for _ in range(3)), backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter")
def test_triton_accepts_inputs_that_require_grad():
    q = torch.randn(1, 1, 8, 8, requires_grad=True)
    assert dispatch.select(problem(q), "triton").name == "triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter")
def test_triton_backward_that_cannot_load_is_a_reason(monkeypatch):
    from vstar_kernels.ops import _load

    monkeypatch.setattr(_load, "triton_backward_ops", lambda: _load.Probe(None, "backward kernels missing (test)"))
    q = torch.randn(1, 1, 8, 8, requires_grad=True)
    with pytest.raises(vk.BackendUnavailableError, match=r"inputs require grad and backward kernels missing \(test\)"):
        dispatch.select(problem(q), "triton")
    with torch.no_grad():
        assert dispatch.select(problem(q), "triton").name == "triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter")
def test_triton_without_interpreter_explains(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(vk.BackendUnavailableError, match="TRITON_INTERPRET"):
        vk.tar_attention(*(torch.randn(1, 1, 8, 8) for _ in range(3)), backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter")
@pytest.mark.parametrize("value, expected", [
    ("y", "ran"),
    (" 1", "cpu tensors need TRITON_INTERPRET=1 (the Triton interpreter); compiled kernels run on CUDA tensors"),
])
def test_triton_interpret_is_read_as_triton_reads_it(value, expected):
    """Read otherwise (y off, " 1" on, where Triton reads them the other way), the check that Triton's mode is the
    one asked for failed with advice to set the variable that was set."""
    code = ("import torch, vstar_kernels as vk\n"
            "q = torch.randn(1, 1, 8, 8)\n"
            "try:\n"
            "    vk.tar_attention(q, q, q, backend='triton')\n"
            "    print('ran')\n"
            "except vk.BackendUnavailableError as exc:\n"
            "    print(exc)\n")
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "TRITON_INTERPRET": value}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith(expected)


def test_triton_interpret_without_triton_is_read_as_triton_3_9_reads_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    for value, on in (("1", True), ("Y", True), ("yes", True), ("On", True), ("TRUE", True), (" 1", False),
                      ("t", False), ("0", False), ("", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert vk._env.interpreter_requested() == on, value


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter")
def test_interpreter_turned_on_after_import_says_what_to_do():
    """Using vstar_kernels imports triton, which keeps the mode of that import: setting
    TRITON_INTERPRET=1 afterwards cannot work, and the error says where to set it instead."""
    code = ("import os, torch, vstar_kernels as vk\n"
            "vk.tar_attention  # its first use loads the kernels' modules, and triton with them\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "q = torch.randn(1, 1, 8, 8)\n"
            "try:\n"
            "    vk.tar_attention(q, q, q, backend='triton')\n"
            "except vk.BackendUnavailableError as exc:\n"
            "    print(exc)\n"
            "del os.environ['TRITON_INTERPRET']  # back to the mode of the import: not held against it\n"
            "print(vk.dispatch.availability('cpu')['triton'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "backend='triton' cannot run this call: TRITON_INTERPRET was 0 when triton was imported and is 1 now; "
        "triton keeps the mode of its first import, so set TRITON_INTERPRET in the environment before Python "
        "starts (TRITON_INTERPRET=1 python script.py), or in os.environ at the top of the script, before "
        "importing torch or vstar_kernels",
        "cpu tensors need TRITON_INTERPRET=1 (the Triton interpreter); compiled kernels run on CUDA tensors"]


def test_missing_triton_is_reported_not_raised_at_import(monkeypatch):
    from vstar_kernels.ops import _load

    monkeypatch.setattr(_load, "triton_ops", lambda: _load.Probe(None, "triton is not importable (test)"))
    with pytest.raises(vk.BackendUnavailableError, match=r"triton is not importable \(test\)"):
        vk.tar_attention(*(torch.randn(1, 1, 8, 8) for _ in range(3)), backend="triton")
    assert dispatch.availability("cpu")["triton"] == "triton is not importable (test)"
    assert dispatch.availability("cpu")["reference"] == dispatch.availability("cpu")["cpu"] == ""


@pytest.mark.parametrize("version, ok", [("3.6.0", False), ("3.0.0", False), ("3.6rc1", False), ("3.7.1", True),
                                         ("3.10.0+git1a2b", True), ("3.8rc1", True), ("4.0.0", True)])
def test_a_triton_older_than_the_kernels_need_is_a_reason(monkeypatch, version, ok):
    """Triton 3.6's front end rejects the tiled forward: an older Triton is named as the reason, never a compile
    error at the first call."""
    import triton
    from vstar_kernels.ops import _load

    monkeypatch.setattr(triton, "__version__", version)
    _load._load_triton_ops.cache_clear()
    try:
        reason = _load.triton_ops().reason
    finally:
        _load._load_triton_ops.cache_clear()
    if ok:
        assert reason == ""
    else:
        assert reason == (f"the Triton kernels need Triton 3.7 or later (older front ends reject them: 3.6 cannot "
                          f"compile the tiled forward), installed: {version}; a CUDA torch pins its Triton (torch "
                          f"2.13 brings 3.7.1)")


def test_auto_error_lists_every_backend(monkeypatch):
    class Refuses(dispatch.Backend):
        def not_supported_reasons(self, problem):
            return ["refused for the test"]

    monkeypatch.setitem(dispatch.BACKENDS, "cpu", Refuses())
    monkeypatch.setitem(dispatch.BACKENDS, "reference", Refuses())
    with pytest.raises(vk.BackendUnavailableError, match="no backend can run this call: cpu: refused for the test "
                                                         r"\| reference: refused for the test"):
        vk.tar_attention(*(torch.randn(1, 1, 8, 8) for _ in range(3)))


def test_a_cuda_call_makes_its_device_the_current_one(monkeypatch):
    """Triton launches on the current CUDA device: the op's forward and backward run inside _device_of(q), which
    makes a CUDA q's device the current one (a GPU test runs a call on a second GPU, tests/kernels/test_gpu.py)."""
    import contextlib

    from vstar_kernels import _op

    class OnSecondGpu:
        is_cuda, device = True, torch.device("cuda", 1)

    assert isinstance(_op._device_of(OnSecondGpu()), torch.cuda.device)
    assert not isinstance(_op._device_of(torch.zeros(1)), torch.cuda.device)
    entered = []
    real = _op._device_of

    @contextlib.contextmanager
    def recording(q):
        entered.append(q.shape)
        with real(q):
            yield

    monkeypatch.setattr(_op, "_device_of", recording)
    q = torch.randn(1, 2, 130, 16, requires_grad=True)  # the tiled kernels: a backward op of its own
    vk.tar_attention(q, q, q, backend="triton").sum().backward()
    assert entered == [q.shape, q.shape]  # the forward, the backward
