"""Which layout the Triton kernels use for a call, and what the forward saves for the backward.

No triton import: the fake (meta) functions of the torch.library op use this
to give the saved statistics their shape without loading any kernel.
"""

from __future__ import annotations

SHORT_MAX = 128  # packed layout for max(Nq, Nk) <= SHORT_MAX (64 when a head dim is > 128)
DOT_MIN = 16     # smallest tl.dot extent

# Row statistics the tiled forward saves for the backward, per (sequence, query row), float32:
# the raw row max of S (the m_i of the bias) and the log-sum-exp of S'. Which keys tie at the
# max is not saved: the backward finds the ties itself, in its own arithmetic (ops/tar_bwd.py).
STATS_FIELDS = 2
STAT_MAX, STAT_LSE = range(STATS_FIELDS)

# Per-row values the backward's dQ pass hands to its dK/dV pass, float32: D_i = sum_j P_ij dP_ij,
# the share of the max's gradient each tie key receives, the raw row max of S as the backward
# recomputes it, how many keys reach that max, and 1 / sum_j exp(S'_ij - lse_i), the factor
# that makes the recomputed probabilities sum to one.
AUX_FIELDS = 5
AUX_D, AUX_SHARE, AUX_MAX, AUX_COUNT, AUX_NORM = range(AUX_FIELDS)


def pow2(n: int, lo: int = 1) -> int:
    """The smallest power of two >= max(n, lo)."""
    n = max(n, lo)
    return 1 << (n - 1).bit_length()


def head_chunks(d: int) -> tuple:
    """(BLOCK, BLOCK2): the power-of-two column chunks a forward kernel holds a head dim d in, each at least
    DOT_MIN (tl.dot's least extent); BLOCK2 = 0 for one chunk. Two chunks where they are narrower
    than the one power of two above d (80 = 64 + 16, 40 -> 32 + 16, 96 = 64 + 32, 160 = 128 + 32):
    the products then run at 80 columns, not 128. The columns past d are zero (masked loads). The
    backward holds d in the one power of two (launch.common_meta: in chunks it spilled)."""
    whole = pow2(d, DOT_MIN)
    first = whole // 2
    second = pow2(d - first, DOT_MIN) if d > first else 0
    if first >= DOT_MIN and 0 < second and first + second < whole:
        return first, second
    return whole, 0


def block_dims(d: int, dv: int) -> tuple:
    """The head-dim columns the forward kernels' products run at, for d and dv (`head_chunks`' sum)."""
    return sum(head_chunks(d)), sum(head_chunks(dv))


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
