"""Which layout the Triton kernels use for a call, and what the forward saves for the backward.

No triton import: the fake (meta) functions of the torch.library op use this
to give the saved statistics their shape without loading any kernel.
"""

from __future__ import annotations

SHORT_MAX = 128  # packed layout for max(Nq, Nk) <= SHORT_MAX (64 when a head dim is > 128)
DOT_MIN = 16     # smallest tl.dot extent

# Row statistics the tiled forward saves for the backward, per (sequence, query row), float32:
# the raw row max of S, the log-sum-exp of S', the arg-max index of S (first maximal key) and
# the number of keys that reach the max; the last two are int32 stored bit for bit.
STATS_FIELDS = 4
STAT_MAX, STAT_LSE, STAT_ARG, STAT_COUNT = range(STATS_FIELDS)


def pow2(n: int, lo: int = 1) -> int:
    """The smallest power of two >= max(n, lo)."""
    n = max(n, lo)
    return 1 << (n - 1).bit_length()


def block_dims(d: int, dv: int) -> tuple:
    return pow2(d, DOT_MIN), pow2(dv, DOT_MIN)


def packed_limit(block_d: int) -> int:
    return SHORT_MAX if block_d <= 128 else SHORT_MAX // 2


def is_packed(nq, nk, d, dv) -> bool:
    """True when whole sequences fit in one tile: forward and backward then recompute everything.

    Plain comparisons (the limits are powers of two), so symbolic sizes work in fake functions.
    """
    limit = SHORT_MAX if (d <= 128 and dv <= 128) else SHORT_MAX // 2
    return nq <= limit and nk <= limit


def stats_shape(bh: int, nq: int, nk: int, d: int, dv: int, needs_grad: bool) -> tuple:
    """Shape of the statistics a Triton forward saves: only the tiled layout needs them."""
    if needs_grad and not is_packed(nq, nk, d, dv):
        return (bh, nq, STATS_FIELDS)
    return (0, STATS_FIELDS)
