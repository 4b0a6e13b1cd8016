"""The public entry point: validation, backend choice, and the call (through the vstar::tar_attention op)."""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from ._op import tar_attention_op
from ._problem import check_device, check_speculation, make_problem
from .dispatch import op_backend


def tar_attention(q, k, v, *, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row",
                  scale=None, frames=None, key_mask=None, backend="auto", speculate=True,
                  flags=None) -> torch.Tensor:
    """Attention with VSTAR's temporal attention regularization (TAR).

    For each (batch, head) slice::

        S   = scale * q @ k^T                 (-inf where j > i if causal, and where key_mask is False)
        m_i = max_j S_ij                      (max_mode="row")  or  max_ij S_ij  ("global")
        S'  = S + strength * m * dA,  dA_ij = exp(-0.5 * ((j - i) / sigma) ** 2)  or `delta`
        out = softmax(S', dim=-1) @ v

    With frame ids, i and j in dA are the frames f(q_i) and f(k_j) of the tokens (0 where either
    id is -1). The definition, frame ids, key masks, dtypes, gradients and NaN/inf handling are in
    docs/semantics.md; the arguments and the backends in docs/api.md.

    Args:
        q, k, v: (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, Dv) (or 3-D without H), any strides;
            float16, bfloat16, float32 (float64: the reference and cpu backends), one dtype and device.
        sigma: width of the Gaussian, > 0 (``math.inf`` allowed); checked with `delta` too.
        strength: the factor of the bias, a finite real within the float32 range (float64 input:
            the float64 range); 0 gives plain attention.
        delta: optional matrix replacing the Gaussian, broadcastable to (B, H, Nq, Nk); with
            `frames`, the (F, F) frame matrix, F = the largest id + 1.
        causal: mask keys j > i (top-left aligned) before the max.
        max_mode: "row" (one max per query row) or "global" (one per (batch, head)).
        scale: softmax scale, > 0, default ``D ** -0.5``; bounded as strength is.
        frames: None, or integer frame ids (-1 outside the video): one (N,) tensor for
            self-attention or a pair (q_frames, k_frames); `vstar_kernels.frame_ids` builds them. Or a
            `vstar_kernels.FrameLayout`, that layout for self-attention, whose ids are then not read.
        key_mask: None, or a (B, Nk) bool tensor, True for a key to attend to.
        backend: "auto", "triton", "triton-lean" (the video DiTs' regular frame layout, built for sm_90,
            where "auto" takes it), "cuda", "cpu" or "reference"; an explicit backend that cannot run the
            call raises BackendUnavailableError.
        speculate: with frame ids, the Gaussian and the row max on the "triton" or "triton-lean" backend,
            one pass over the keys with a guessed m_i, the rows guessed wrong recomputed: the two-pass
            result (bit for bit at the same tiles on "triton"; to rounding for the recomputed rows on
            "triton-lean"; docs/api.md, "The speculative forward"); False runs two passes. Other calls,
            and sequences of more than 2**30 - 2**10 queries or keys, ignore it.
        flags: None, or an int64 tensor of shape (2,) on q's device, to which a speculative call adds
            (rows recomputed, rows) without a host synchronisation; `Speculation` reads it.

    Returns:
        (B, H, Nq, Dv) (or (B, Nq, Dv) for 3-D input), q's dtype and device. The call is the
        custom op ``torch.ops.vstar.tar_attention`` (docs/compile-and-autograd.md).
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("delta", delta)):
        if isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(f"tar_attention has no forward-mode derivative, and {name} carries a tangent "
                                      "(torch.func.jvp, jacfwd, torch.autograd.forward_ad): its tangent would be "
                                      "dropped. Use reverse mode (torch.autograd)")
    problem = make_problem(q, k, v, sigma=sigma, strength=strength, delta=delta, causal=causal,
                           max_mode=max_mode, scale=scale, frames=frames, key_mask=key_mask)
    check_speculation(speculate, flags, problem.device)
    return problem.restore(tar_attention_op(problem, op_backend(problem, backend), speculate, flags))


class Speculation:
    """The speculative one pass or two passes, chosen per step for a call site that runs every step (the cost
    model, BREAK_EVEN, PROBE and PROBE_MAX: docs/api.md, "The speculative forward"). `kwargs` gives a step's calls
    their tar_attention arguments; `next_step` (once per step, one host synchronisation) reads the rows they flagged
    and chooses the next step's form: two passes after a step that flagged more than BREAK_EVEN of its rows, and
    one speculative step (a probe) after PROBE steps of them, after twice as many each time a probe flags too many
    again (at most PROBE_MAX), so that a model whose rows are all flagged pays for a few probes a run, not one in
    every PROBE + 1 steps.
    """

    # The measurements behind these (one pass vs two at 0 / 5 / 20 / 100% of rows flagged, Wan, CogVideoX,
    # LTX-Video): docs/api.md, "The speculative forward", and benchmarks/NOTES.md.
    BREAK_EVEN = 0.05
    PROBE = 8
    PROBE_MAX = 64

    def __init__(self):
        self.speculate = True
        self.rate = None  # the last measured share of rows recomputed
        self._counts = {}  # device -> its calls' (flagged, rows), int64 (2,)
        self._two_pass_steps = 0
        self._wait = self.PROBE  # two-pass steps before the next probe
        self._probe = False  # the speculative step now is a probe

    def kwargs(self, device) -> dict:
        """tar_attention's speculate= and flags= for a call on `device` (one count per device: a model split over
        several GPUs counts on each; a call on meta tensors, which computes nothing, counts nothing)."""
        device = check_device("Speculation.kwargs: device", device, none=False)  # q.device, "cuda:0", 0
        if device.type == "meta":
            return dict(speculate=self.speculate, flags=None)
        if device.type == "cpu":
            device = torch.device("cpu")  # "cpu:0" too
        elif device.index is None:  # "cuda": the current one, as its tensors name it ("cuda:0")
            device = torch.empty(0, device=device).device
        if device not in self._counts:  # a normal tensor, also when made in inference mode: later calls add to it
            with torch.inference_mode(False):
                self._counts[device] = torch.zeros(2, dtype=torch.int64, device=device)
        return dict(speculate=self.speculate, flags=self._counts[device])

    def next_step(self) -> None:
        """Choose the next step's form from this step's counts, summed over devices (kept where no call counted)."""
        if self._counts:
            flagged = rows = 0
            for counts in self._counts.values():
                f, r = counts.tolist()
                counts.zero_()
                flagged, rows = flagged + f, rows + r
            if rows:
                self.rate = flagged / rows
                self.speculate = self.rate <= self.BREAK_EVEN
                if not self.speculate:
                    self._wait = min(2 * self._wait, self.PROBE_MAX) if self._probe else self.PROBE
                self._probe = False
                self._two_pass_steps = 0
                return
        if not self.speculate:
            self._two_pass_steps += 1
            self.speculate = self._probe = self._two_pass_steps >= self._wait
