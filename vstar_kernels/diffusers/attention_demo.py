"""The attention demo: a tiny random UNet3DConditionModel's temporal attention without and with TAR.

Built from a config and run once at step 0; docs/attention-analysis.md (Demo) says what it shows, and why the
band is weaker than in a trained model.
"""

from __future__ import annotations

import numbers
from typing import Dict

import torch

from .._deprecation import renamed_keywords
from ..analysis import band_energy, check_drawing, diagonality, plot_attention_maps, short_layer_name
from ..tar_config import TARConfig
from .capture import capture_temporal_attention
from .install import apply_tar, remove_tar


def tiny_unet3d(seed: int = 0):
    """A random two-level UNet3DConditionModel (ModelScope's architecture, 32/64 channels, head dim 8)."""
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    return UNet3DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
        attention_head_dim=8, sample_size=16,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D")).eval()


@renamed_keywords(frames="num_frames", scale="color_scale")
def attention_demo(path, *, num_frames: int = 16, sigma: float = 1.0, strength: float = 1.0, size: int = 16,
                   seed: int = 0, dpi: int = 100, color_scale: str = "shared") -> Dict[str, dict]:
    """Capture the level-0 temporal attention maps at step 0 without and with TAR; draw them into `path`.

    One row per run, one panel per level-0 temporal attention layer (docs/attention-analysis.md, Demo).
    ``frames`` and ``scale`` are the deprecated spellings of ``num_frames`` and ``color_scale``.

    Returns:
        ``{"without TAR": {layer: map}, "with TAR": {layer: map}}``, (frames, frames) float64 maps.
    """
    for name, value in (("num_frames", num_frames), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 2:
            raise ValueError(f"{name} must be an int >= 2, got {value!r}")
    num_frames, size = int(num_frames), int(size)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -2 ** 63 <= int(seed) < 2 ** 64:
        raise ValueError(f"seed must be an int from -2**63 to 2**64 - 1 (torch.manual_seed's), got {seed!r}")
    seed = int(seed)  # torch.Generator's manual_seed takes no numpy int
    check_drawing("attention_demo", path, color_scale, dpi)  # before the two runs
    model = tiny_unet3d(seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = dict(sample=torch.randn(1, 4, num_frames, size, size, generator=generator), timestep=torch.tensor(999),
                  encoder_hidden_states=torch.randn(1, 4, 16, generator=generator))
    config = TARConfig(levels={0: (sigma, strength)}, until_step=0)
    layers = apply_tar(model, config)  # the layers TAR regularizes, watched in both runs
    remove_tar(model)
    runs = {"without TAR": _step0_maps(model, inputs, layers)}
    apply_tar(model, config)
    runs["with TAR"] = _step0_maps(model, inputs, layers)
    remove_tar(model)
    if not all(torch.isfinite(m).all() for m in runs["with TAR"].values()):  # before drawing, which names no cause
        raise ValueError(f"strength={strength:g} made the attention with TAR non-finite: strength times a row's max "
                         "score passed float32's range; take a smaller strength")
    title = f"tiny random UNet3D, {num_frames} frames, step 0; TAR sigma={sigma:g}, strength={strength:g}"
    plot_attention_maps(runs, path, color_scale=color_scale, title=title, dpi=dpi)
    return runs


def _step0_maps(model, inputs, layers) -> dict:
    with torch.no_grad(), capture_temporal_attention(model, layers=layers) as maps:
        model(**inputs)
    return {layer: maps[(layer, 0)] for layer in layers}


def report(runs: Dict[str, dict]) -> str:
    """A table of diagonality and band energy (within 1 frame) per layer and run, and their means."""
    stats = {run: {layer: (float(diagonality(m)), float(band_energy(m, 1))) for layer, m in maps.items()}
             for run, maps in runs.items()}
    layers = list(next(iter(runs.values())))
    means = {run: [sum(v[i] for v in stats[run].values()) / len(layers) for i in (0, 1)] for run in runs}

    def row(label: str, values: Dict[str, tuple]) -> str:  # values: run -> (diagonality, band energy)
        return f"{label:<28}" + "".join(f"{values[run][i]:>22.3f}" for i in (0, 1) for run in runs)

    header = f"{'layer':<28}" + "".join(f"{name + ' ' + run:>22}" for name in ("diag", "band1") for run in runs)
    lines = [header, "-" * len(header)]
    lines += [row(short_layer_name(layer), {run: stats[run][layer] for run in runs}) for layer in layers]
    lines.append(row("mean", means))
    return "\n".join(lines)
