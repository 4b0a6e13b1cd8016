"""Exact frame-aware TAR under diffusers' context parallelism (Ulysses, ring, and both at once; docs/multi-gpu.md).

A regularized call does not use diffusers' parallel attention: `local_stock_call` runs the stock processor on this
rank's shard with the native backend, and `ContextParallelTAR.attention` answers its SDPA call with its own
collectives (autograd functions) around ONE `tar_attention` call of the rank's queries against every key.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

from ..frames import FrameLayout, TokenLayout, as_layout, layout_ids
from .interception import innermost

_SWAPPED = ("_attention_backend", "_parallel_config")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 (one block per rank): block p goes to rank p, and block p of
    the result came from rank p. It is its own transpose, so the backward is the same exchange."""

    @staticmethod
    def forward(ctx, blocks: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_to_all(blocks, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.group), None


class _AllGather(torch.autograd.Function):
    """(shape) -> (P, shape): every rank's tensor, in group rank order. The backward sums each
    rank's gradient for this rank's block (a reduce-scatter, here an all-to-all and a sum)."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        gathered = shard.new_empty((dist.get_world_size(group), *shard.shape))
        dist.all_gather(list(gathered.unbind(0)), shard.contiguous(), group=group)
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.group).sum(dim=0), None


def _all_to_all(blocks: torch.Tensor, group) -> torch.Tensor:
    blocks = blocks.contiguous()
    out = torch.empty_like(blocks)
    dist.all_to_all_single(out, blocks, group=group)
    return out


# The exchanged blocks are laid out token-major, (tokens, B, heads, D): the received buffer then reads as the
# sequence in order, a (B, heads, N, D) view without a copy (tar_attention takes any strides).


def _heads_to_sequence(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """(B, H, n, D) sequence shard, all heads -> (B, H / size, size * n, D): the group's `size`
    shards in group rank order, for this rank's block of H / size heads."""
    batch, heads, n, dim = x.shape
    blocks = x.reshape(batch, size, heads // size, n, dim).permute(1, 3, 0, 2, 4)  # block p: the heads rank p gets
    got = _AllToAll.apply(blocks, group)                                          # block p: rank p's tokens, my heads
    return got.reshape(size * n, batch, heads // size, dim).permute(1, 2, 0, 3)


def _sequence_to_heads(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """The inverse of `_heads_to_sequence`: (B, h, size * n, D) -> (B, h * size, n, D), a view of a
    (B, n, h * size, D) tensor (the layout the processors go on with)."""
    batch, heads, tokens, dim = x.shape
    n = tokens // size
    blocks = x.reshape(batch, heads, size, n, dim).permute(2, 3, 0, 1, 4)  # block p: rank p's tokens
    got = _AllToAll.apply(blocks, group)                                  # block p: rank p's heads, my tokens
    return got.permute(2, 1, 0, 3, 4).reshape(batch, n, size * heads, dim).transpose(1, 2)


def _gather_sequence(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """(B, h, n, D) -> (B, h, size * n, D): the group's shards along the sequence, in group rank order."""
    batch, heads, n, dim = x.shape
    gathered = _AllGather.apply(x.permute(2, 0, 1, 3), group)  # (size, n, B, h, D)
    return gathered.reshape(size * n, batch, heads, dim).permute(1, 2, 0, 3)


def _ids(video: Tuple[Tuple[int, int], ...], shard: int, shards: Tuple[int, ...], device: torch.device
         ) -> torch.Tensor:
    """Frame ids of the tokens of `shards` (each `shard` tokens long, in that order) of a video laid out as the runs
    `video` ((frame id, tokens), ... in sequence order: `TokenLayout.video_runs`), from frames.layout_ids (kept per
    layout: tar_attention reads their values once)."""
    starts = list(itertools.accumulate((tokens for _, tokens in video), initial=0))
    runs = []
    for index in shards:
        lo, hi = index * shard, (index + 1) * shard
        runs += [(frame, min(hi, end) - max(lo, start))
                 for (frame, _), start, end in zip(video, starts, starts[1:]) if start < hi and end > lo]
    return layout_ids(tuple(runs), 0, 0, device)


# Shard order of each ContextParallelConfig seen: (query shards, key shards).
_ORDERS = WeakIdKeyDictionary()


@contextlib.contextmanager
def local_stock_call(processor) -> Iterator[None]:
    """For one call: the stock `processor` without its parallel config, on the native backend (so that its
    attention runs ``scaled_dot_product_attention`` on this rank's local q, k, v). Both attributes are put
    back as they were on exit, also when the call raises: one the instance did not have is removed again. A
    wrapper's (a capture's, between TAR's and the stock one) are those of the processor it wraps."""
    from diffusers.models.attention_dispatch import AttentionBackendName  # diffusers with context parallelism

    processor = innermost(processor)  # a wrapper's attributes forward to it: vars() would find none to put back
    saved = {name: vars(processor)[name] for name in _SWAPPED if name in vars(processor)}
    processor._attention_backend = AttentionBackendName.NATIVE
    processor._parallel_config = None
    try:
        yield
    finally:
        for name in _SWAPPED:
            if name in saved:
                setattr(processor, name, saved[name])
            else:
                vars(processor).pop(name, None)


class ContextParallelTAR:
    """The groups of one context-parallel layout, and the regularized attention over them."""

    def __init__(self, config, where: str):
        self.config, self.where = config, where
        self.ring, self.ulysses = config.ring_degree, config.ulysses_degree
        self.shards = self.ring * self.ulysses
        self.degrees = f"ring_degree={self.ring}, ulysses_degree={self.ulysses}"
        self.ring_group = config._ring_mesh.get_group()
        self.ulysses_group = config._ulysses_mesh.get_group()

    @classmethod
    def of(cls, processor, text: str, where: str) -> Optional["ContextParallelTAR"]:
        """The layout of the stock `processor`'s parallel config (None without one); raises for any config TAR
        cannot run exactly, and for a family whose regularized attention has text tokens (`text` not "none")."""
        config = getattr(processor, "_parallel_config", None)
        if config is None:
            return None
        from diffusers import ContextParallelConfig, ParallelConfig  # a diffusers with parallel configs

        if not isinstance(config, ParallelConfig) or not isinstance(config.context_parallel_config,
                                                                    ContextParallelConfig):
            raise TypeError(f"{where}: the processor's parallel config is {config!r}; TAR runs under diffusers' "
                            "ParallelConfig with a ContextParallelConfig (model.enable_parallelism) only")
        cp = config.context_parallel_config
        if cp._flattened_mesh is None:
            raise ValueError(f"{where}: the processor's ContextParallelConfig is not set up (no device mesh); "
                             "enable it with model.enable_parallelism(config=...)")
        sizes = (cp._ring_mesh.size(), cp._ulysses_mesh.size())
        if sizes != (cp.ring_degree, cp.ulysses_degree):  # diffusers reads the degrees and the mesh apart
            raise ValueError(f"{where}: the ContextParallelConfig's mesh has {sizes[0]} ranks along its ring "
                             f"dimension and {sizes[1]} along its Ulysses one, but the config says "
                             f"ring_degree={cp.ring_degree}, ulysses_degree={cp.ulysses_degree}: give the degrees "
                             "of the mesh")
        if text != "none":
            raise ValueError(
                f"{where}: TAR under context parallelism handles self-attention over video tokens only; this model's "
                f"regularized attention joins text tokens ({text} the video), whose sharding TAR does not know")
        return cls(cp, where)

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask, is_causal: bool,
                  grid: Optional[TokenLayout], attend: Callable[..., torch.Tensor]) -> torch.Tensor:
        """TAR over the whole sequence for this rank's (B, H, n, D) shard of queries; returns its (B, H, n, Dv).

        `attend(q, k, v, frames=(q_ids, k_ids))` computes the regularized attention. Every check has the same
        outcome on every rank (no rank waits for one that raised), and all but the mesh's (`shard_order`, after
        the first call's exchanges) run before any communication.
        """
        where = self.where
        if grid is None:
            raise RuntimeError(f"{where}: called outside a forward call of the model, so the frame layout is unknown")
        if mask is not None:
            raise ValueError(f"{where}: TAR under context parallelism takes no attention mask; the processor passed "
                             f"a {mask.dtype} mask of shape {tuple(mask.shape)}")
        if is_causal:
            raise ValueError(f"{where}: TAR under context parallelism takes no causal attention")
        for name, t in (("key", key), ("value", value)):  # as one call would (torch.cat below would promote)
            if t.dtype != query.dtype:
                raise TypeError(f"{where}: {name} has dtype {t.dtype} but query has {query.dtype}: query, key and "
                                "value must share one dtype")
        batch, heads, local, _ = query.shape
        if key.shape[2] != local or value.shape[2] != local:
            raise ValueError(f"{where}: expected a self-attention over this rank's shard of the video tokens, got "
                             f"{local} queries and {key.shape[2]} keys")
        grid = as_layout(grid)  # or a (frames, tokens per frame) pair, as token_grid.token_frames takes
        if grid.repeat_from is not None or grid.before or grid.after:
            raise ValueError(f"{where}: TAR under context parallelism handles a call of video tokens alone; this "
                             f"call's token layout ({grid}) has other tokens")
        video = grid.video_runs()
        tokens = sum(count for _, count in video)
        if local * self.shards != tokens:
            raise ValueError(
                f"{where}: under context parallelism ({self.degrees}) this rank holds {local} tokens, and "
                f"{self.shards} equal shards of {local} are {local * self.shards} tokens, not the call's {tokens} "
                f"tokens ({grid.describe()}): TAR needs even shards of the whole sequence (uneven shards of "
                "ring_anything/ulysses_anything, or a plan that shards otherwise, are not supported)")
        if heads % self.ulysses:
            raise ValueError(f"{where}: Ulysses with ulysses_degree={self.ulysses} needs a head count it divides; the "
                             f"call has {heads} heads")
        head_dim, v_dim = query.shape[-1], value.shape[-1]
        if self.ulysses > 1:  # q, k and v in one exchange
            qkv = _heads_to_sequence(torch.cat((query, key, value), dim=-1), self.ulysses_group, self.ulysses)
            query, kv = qkv.split((head_dim, head_dim + v_dim), dim=-1)
        else:
            kv = torch.cat((key, value), dim=-1)
        if self.ring > 1:  # k and v in one gather
            kv = _gather_sequence(kv, self.ring_group, self.ring)
        key, value = kv.split((head_dim, v_dim), dim=-1)
        query_shards, key_shards = self.shard_order(query.device)
        regular = video == tuple((frame, grid.per_frame) for frame in range(grid.frames))
        if regular and query_shards == key_shards == tuple(range(self.shards)):
            frames = FrameLayout(grid.frames, grid.per_frame)  # the whole video in order (Ulysses alone)
        else:
            frames = (_ids(video, local, query_shards, query.device), _ids(video, local, key_shards, query.device))
        out = attend(query, key, value, frames=frames)
        if self.ulysses > 1:
            out = _sequence_to_heads(out, self.ulysses_group, self.ulysses)
        return out

    def shard_order(self, device) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """(the shards this rank's queries come from, the shards of all keys), in the order the collectives
        deliver them (docs/multi-gpu.md, How); exchanged over the layout's ranks once per ContextParallelConfig.
        Every rank gets the same table, so the head-block check has the same outcome everywhere."""
        config = self.config
        if config in _ORDERS:
            return _ORDERS[config]
        flat = config._flattened_mesh.get_group()
        groups = (self.ring_group, self.ulysses_group)
        mine = [dist.get_rank(flat), *(dist.get_rank(g) for g in groups),
                *(min(dist.get_process_group_ranks(g)) for g in groups)]
        table = torch.empty(self.shards, len(mine), dtype=torch.int64, device=device)
        dist.all_gather(list(table.unbind(0)), torch.tensor(mine, dtype=torch.int64, device=device), group=flat)
        rows = [tuple(row) for row in table.tolist()]  # (shard, ring rank, ulysses rank, ring group, ulysses group)
        for ring_group in {row[3] for row in rows}:
            heads = {row[2] for row in rows if row[3] == ring_group}
            if len(heads) > 1:
                raise ValueError(
                    f"{self.where}: under context parallelism ({self.degrees}) the members of a ring group hold "
                    f"different blocks of heads (Ulysses ranks {sorted(heads)}): the device mesh's ring and Ulysses "
                    "groups do not line up (diffusers' ring would mix heads too)")

        def ulysses_shards(group):
            return tuple(row[0] for row in sorted((row for row in rows if row[4] == group), key=lambda row: row[2]))

        me = rows[mine[0]]
        ring = sorted((row for row in rows if row[3] == me[3]), key=lambda row: row[1])
        order = ulysses_shards(me[4]), sum((ulysses_shards(row[4]) for row in ring), ())
        _ORDERS[config] = order
        return order
