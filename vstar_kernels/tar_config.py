"""Where and when TAR regularizes a video model: per-level specs, the step gate, VSTAR's presets.
Shared by every front-end; needs only torch (`vstar_kernels.diffusers` needs diffusers)."""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Dict, Iterable, Mapping, Optional

import torch

from ._problem import _check_tensor, _real, check_sigma, check_values, int_set, type_name
from .dispatch import BACKEND_NAMES


@dataclass(frozen=True, eq=False)
class LevelSpec:
    """What TAR adds at one resolution level: ``strength * m_i * dA_ij``, dA the Gaussian of `sigma` (default
    1) or `delta`, a custom (N, N) matrix (docs/vsp-and-dynamics.md); not both. A delta is copied (float32,
    float64 kept), moved to each call's device once, never resampled: another number of frames raises.
    """

    sigma: Optional[float] = None
    strength: float = 1.0
    delta: Optional[torch.Tensor] = None
    _copies: Dict[Any, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _largest: float = field(default=0.0, init=False, repr=False)  # |strength| x the delta's largest |entry|

    def __post_init__(self):
        if self.delta is None:
            object.__setattr__(self, "sigma", 1.0 if self.sigma is None else check_sigma(self.sigma))
        else:
            if self.sigma is not None:
                raise ValueError("give sigma or delta, not both: a delta replaces the Gaussian")
            object.__setattr__(self, "delta", _checked_delta(self.delta))
        strength = _real("strength", self.strength)
        if not math.isfinite(strength):
            raise ValueError(f"strength must be finite, got {strength}")
        object.__setattr__(self, "strength", strength)
        if self.delta is not None:  # read once here, not in (compiled) calls
            object.__setattr__(self, "_largest", abs(strength) * float(self.delta.abs().max()))

    @property
    def active(self) -> bool:
        """False when the bias cannot change the attention (strength 0, or sigma = inf)."""
        return self.strength != 0.0 and (self.delta is not None or math.isfinite(self.sigma))

    def tar_kwargs(self, nq: int, nk: int, *, device, dtype, where: str) -> dict:
        """`tar_attention` keywords for nq queries and nk keys (frames); `where` names the call site in errors."""
        if self.delta is None:
            return {"sigma": self.sigma, "strength": self.strength}
        if tuple(self.delta.shape) != (nq, nk):
            n = self.delta.shape[0]
            if nq != nk:
                raise ValueError(f"{where}: the level's delta is {n} x {n} (a delta is square) but this attention runs "
                                 f"{nq} query frames against {nk} key frames: regularize this level with sigma")
            raise ValueError(
                f"{where}: the level's delta is {n} x {n} but this attention runs over {nq} frames; a delta is "
                f"not resampled: build it for {nq} frames, e.g. delta_from_features(features, num_frames={nq})")
        work = torch.float64 if dtype == torch.float64 else torch.float32
        key = (torch.device(device), work)
        copy = self._copies.get(key)
        if work == torch.float32 and self._largest > torch.finfo(torch.float32).max:  # every row NaN there
            raise ValueError(f"{where}: the level's strength times its delta's largest entry is {self._largest:g}, "
                             f"beyond float32's range, and this attention computes in float32")
        if copy is None:
            copy = self._copies[key] = self.delta.to(device=device, dtype=work)
        return {"delta": copy, "strength": self.strength}

    def __getstate__(self):  # pickle and copy: the per-device copies of delta are made again where used
        return {**vars(self), "_copies": {}}

    def __eq__(self, other):
        if not isinstance(other, LevelSpec):
            return NotImplemented
        if (self.sigma, self.strength) != (other.sigma, other.strength):
            return False
        if self.delta is None or other.delta is None:
            return self.delta is None and other.delta is None
        return self.delta.dtype == other.delta.dtype and torch.equal(self.delta.cpu(), other.delta.cpu())

    def __hash__(self):
        return hash((self.sigma, self.strength, None if self.delta is None else tuple(self.delta.shape)))

    def __repr__(self):
        if self.delta is None:
            return f"LevelSpec(sigma={self.sigma!r}, strength={self.strength!r})"
        n = self.delta.shape[0]
        return f"LevelSpec(delta=<{n}x{n} {str(self.delta.dtype).replace('torch.', '')}>, strength={self.strength!r})"


def _checked_delta(delta) -> torch.Tensor:
    _check_tensor("delta", delta)
    check_values("delta", delta, "LevelSpec")  # its finiteness and largest entry
    if delta.dim() != 2 or delta.shape[0] != delta.shape[1] or delta.shape[0] < 1:
        raise ValueError(f"delta must be a square (frames, frames) matrix, got shape {tuple(delta.shape)}")
    if not torch.isfinite(delta).all():
        raise ValueError("delta has non-finite entries")
    work = torch.float64 if delta.dtype == torch.float64 else torch.float32
    return delta.detach().to(dtype=work, copy=True)


class _ReadOnly(dict):
    """A dict that refuses changes (PRESETS: a preset written in place would change every later config); pickled,
    copied and JSON-dumped as a plain dict, which copy.deepcopy(PRESETS[name]) gives to change."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("vstar_kernels.PRESETS is read-only: change a copy, e.g. dict(PRESETS[name])")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):
        return dict, (dict(self),)

    def __copy__(self):
        return dict(self)

    def __deepcopy__(self, memo):
        return {key: copy.deepcopy(value, memo) for key, value in self.items()}


# VSTAR's code's presets and names: "64" is level 0 (the 40x64 latent), "32" level 1; "D" precedes sigma.
# Strength 1, steps 0..13 of 25.
PRESET_UNTIL_STEP = 13
PRESETS: Mapping[str, Mapping[int, float]] = _ReadOnly({  # read-only: every config built from it shares it
    "64D1": _ReadOnly({0: 1.0}),
    "64D4": _ReadOnly({0: 4.0}),
    "64D8": _ReadOnly({0: 8.0}),
    "64D1_32D8": _ReadOnly({0: 1.0, 1: 8.0}),
    "64D1_32D1": _ReadOnly({0: 1.0, 1: 1.0}),
    "64D1_32D12": _ReadOnly({0: 1.0, 1: 12.0}),
    "64D4_32D8": _ReadOnly({0: 4.0, 1: 8.0}),
    "64D4_32D12": _ReadOnly({0: 4.0, 1: 12.0}),
})


def _level_spec(level, spec) -> LevelSpec:
    if isinstance(spec, LevelSpec):
        return spec
    if isinstance(spec, (str, bytes, torch.Tensor, Mapping)) or not hasattr(spec, "__len__") or len(spec) != 2:
        raise TypeError(f"levels[{level}] must be a (sigma, strength) pair, a (delta, strength) pair or a "
                        f"LevelSpec, got {spec!r}")
    first, strength = spec
    if not isinstance(first, (numbers.Real, torch.Tensor)):  # None, or a numpy delta read as sigma
        raise TypeError(f"levels[{level}]: a pair's first entry is sigma (a number) or a delta (a torch.Tensor), "
                        f"got {type_name(first)}")
    try:
        if isinstance(first, torch.Tensor):
            return LevelSpec(delta=first, strength=strength)
        return LevelSpec(first, strength)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"levels[{level}]: {exc}") from None


@dataclass(frozen=True)
class TARConfig:
    """Where and when TAR regularizes a video model's temporal attention (docs/integrations.md).

    Args:
        levels: level -> (sigma, strength), (delta, strength) or a `LevelSpec`; level 0 is the
            full latent resolution, 1 the next (half), and so on. Levels not listed are left alone.
        until_step: regularize the denoising steps 0..until_step (0 is the noisiest); None: every step.
        include_input_block: also regularize the temporal attention right after conv_in.
        backend: passed to `tar_attention`.
        blocks: video DiTs only: the indices of the transformer blocks to regularize (forward
            order), None for every block; kept as a sorted tuple.
        preset: the VSTAR preset the config was made from (set by `from_preset`); `apply_tar` on a
            DiT refuses such a config, VSTAR's presets being settings for video UNets.
    """

    levels: Mapping[int, Any] = field(hash=False)
    until_step: Optional[int] = 13
    include_input_block: bool = False
    backend: str = "auto"
    blocks: Optional[Iterable[int]] = None
    preset: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.levels, Mapping):
            raise TypeError(f"levels must be a mapping level -> (sigma, strength), got {type(self.levels).__name__}")
        if not self.levels:
            raise ValueError("levels must name at least one level, e.g. {0: (1.0, 1.0)}")
        levels = {}
        for level, spec in self.levels.items():
            if isinstance(level, bool) or not isinstance(level, numbers.Integral) or level < 0:
                raise ValueError(f"levels keys must be ints >= 0 (0 = full latent resolution), got {level!r}")
            levels[int(level)] = _level_spec(int(level), spec)
        # read-only, as the frozen config around it (its hash and the front ends' checks hold for its life)
        object.__setattr__(self, "levels", MappingProxyType(dict(sorted(levels.items()))))
        if self.until_step is not None:
            if isinstance(self.until_step, bool) or not isinstance(self.until_step, numbers.Integral) \
                    or self.until_step < 0:
                raise ValueError(f"until_step must be an int >= 0 or None (every step), got {self.until_step!r}")
            object.__setattr__(self, "until_step", int(self.until_step))
        if not isinstance(self.include_input_block, bool):
            raise TypeError(f"include_input_block must be a bool, got {type_name(self.include_input_block)}")
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {self.backend!r}")
        if isinstance(self.blocks, Mapping):  # its keys would be taken and its values dropped
            raise TypeError(f"blocks must be a collection of ints >= 0 or None, got {self.blocks!r}")
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(sorted(int_set("blocks", self.blocks))))
        if self.preset is not None:
            if not isinstance(self.preset, str) or self.preset not in PRESETS:
                raise ValueError(f"preset must be None or one of VSTAR's presets ({', '.join(PRESETS)}), "
                                 f"got {self.preset!r}")
            if self.levels != _preset_levels(self.preset):  # it names where the levels came from (from_preset)
                raise ValueError(f"preset={self.preset!r} names the VSTAR preset the levels are, and these are not "
                                 f"its levels: leave preset out (None) for levels of one's own")

    @classmethod
    def from_preset(cls, name: str, **changes) -> "TARConfig":
        """A VSTAR preset (``"64D1"``, ``"64D1_32D8"``, ...) for a video UNet; `changes` override other fields.
        The config keeps its `preset`: a video DiT refuses it (the paper has no DiT preset)."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"unknown TAR preset {name!r}; known presets: {', '.join(PRESETS)}")
        fixed = sorted({"preset", "levels"} & changes.keys())
        if fixed:
            raise ValueError(f"from_preset: {' and '.join(fixed)} come from the preset {name!r}; to change them, "
                             "build a TARConfig")
        return cls(levels=_preset_levels(name), **{"until_step": PRESET_UNTIL_STEP, **changes, "preset": name})

    def __reduce__(self):  # pickle and deepcopy: a read-only mapping has no state of its own to copy
        return type(self), (dict(self.levels), self.until_step, self.include_input_block, self.backend, self.blocks,
                            self.preset)

    def __repr__(self) -> str:  # the levels as the dict they were given as
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return "TARConfig(" + ", ".join(f"{k}={dict(v) if k == 'levels' else v!r}" for k, v in values.items()) + ")"

    def regularizes(self, step: int) -> bool:
        """Whether TAR regularizes denoising step `step` (0 = noisiest)."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an int >= 0 (0 = noisiest), got {step!r}")
        return self.until_step is None or int(step) <= self.until_step  # a bool, for numpy's ints too


def uncompiled(model):
    """The module a torch.compile'd model (an OptimizedModule, maybe compiled twice) wraps, any other as it is: TAR
    goes on the modules themselves, and their names (a UNet's levels) are the model's own, not the wrapper's
    ``_orig_mod.``-prefixed ones."""
    while isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


def _preset_levels(name: str) -> dict:
    """The VSTAR preset's levels: each level's sigma at strength 1."""
    return {level: LevelSpec(sigma, 1.0) for level, sigma in PRESETS[name].items()}
