"""TAR against VSTAR's official code (boschresearch/VSTAR), where ``VSTAR_SRC`` points at a checkout of it: its
attention patch (``register_attention_control_vstar``) and the lvdm front end's on copies of the same lvdm temporal
attention modules, laid out as in VideoCrafter2's UNet, for every preset of its ``regularization_dict``, in float64.
Not run in CI (the official code is not on the package index). It needs einops, scipy, matplotlib and PIL, which
the official code imports; cv2 and torchvision, which its utilities import but these functions do not use, are
stood in for where they are not installed.
"""

import copy
import importlib.util
import os
import sys
import types

import pytest
import torch

from vstar_kernels.lvdm import TARConfig, apply_tar_to_modules, set_step

from .test_lvdm_frontend import videocrafter2_select
from .tiny_video_models import one_torch_thread  # noqa: F401 (an autouse fixture)

SOURCE = os.environ.get("VSTAR_SRC")
pytestmark = pytest.mark.skipif(not SOURCE, reason="VSTAR_SRC does not point at a checkout of boschresearch/VSTAR")

FRAMES, HEADS, HEAD_DIM = 16, 4, 8  # 32 channels: the transformer's GroupNorm has 32 groups
# the official code reads a call's level from its rows (batch x height x width of a 40 x 64 latent at level 0);
# the init attention (the input block's, "init") it never regularizes
ROWS = {"init_attn.0": 40 * 64, "input_blocks.1.2": 40 * 64, "input_blocks.4.2": 20 * 32,
        "input_blocks.7.2": 10 * 16, "middle_block.1": 5 * 8, "output_blocks.6.2": 20 * 32,
        "output_blocks.9.2": 40 * 64}
# the official presets' widths as the lvdm front end's levels
LEVELS = {"64": ("input_blocks.1.2", "output_blocks.9.2"), "32": ("input_blocks.4.2", "output_blocks.6.2")}
PRESETS = ["64D1", "64D4", "64D8", "64D1_32D1", "64D1_32D8", "64D1_32D12", "64D4_32D8", "64D4_32D12"]
# float64, inputs of unit scale: the largest difference seen here is 3.3e-16 (8 presets x 4 steps x 14 modules)
TOLERANCE = 1e-15


@pytest.fixture(scope="module")
def official():
    for name in ("einops", "scipy", "matplotlib", "PIL"):
        pytest.importorskip(name, reason=f"the official code imports {name}")
    path, stand_ins = list(sys.path), []
    for name in ("cv2", "torchvision"):
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = types.ModuleType(name)
            stand_ins.append(name)
    sys.path.insert(0, SOURCE)
    try:
        from lvdm.modules import attention
        from utils import attention_utils, test_list
        yield attention, attention_utils, test_list.regularization_dict
    finally:
        # the official packages (lvdm, utils) and the stand-ins go; what they imported (matplotlib, ...) stays
        source = os.path.realpath(SOURCE) + os.sep
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if name in stand_ins or (file and os.path.realpath(file).startswith(source)) \
                    or name in ("lvdm", "utils") or name.startswith(("lvdm.", "utils.")):
                del sys.modules[name]
        sys.path[:] = path


def unet_layout(attention) -> torch.nn.Module:
    """Official lvdm temporal transformers at VideoCrafter2's module names (levels 0 to 3, and the init one)."""
    def temporal():
        return attention.TemporalTransformer(HEADS * HEAD_DIM, HEADS, HEAD_DIM, use_checkpoint=False,
                                             only_self_att=True)

    def at(index, size):
        return torch.nn.ModuleList([temporal() if i == index else torch.nn.Identity() for i in range(size)])

    root = torch.nn.Module()
    root.init_attn = at(0, 1)
    root.input_blocks = torch.nn.ModuleList([at(2, 3) if i in (1, 4, 7) else torch.nn.Identity() for i in range(8)])
    root.middle_block = at(1, 2)
    root.output_blocks = torch.nn.ModuleList([at(2, 3) if i in (6, 9) else torch.nn.Identity() for i in range(10)])
    torch.manual_seed(0)
    return root.double()


class Controller:
    """The attention store the official patch reports every attention map to (kept by no test here)."""

    num_att_layers = 0

    def __call__(self, attention, place_in_unet):
        pass


def test_every_official_preset_is_tested(official):
    assert sorted(official[2]) == sorted(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_the_lvdm_front_end_matches_the_official_code(official, preset):
    attention, attention_utils, regularization = official
    theirs = unet_layout(attention)
    ours = copy.deepcopy(theirs)
    settings = regularization[preset]
    attention_utils.register_attention_control_vstar(theirs, Controller(), settings)
    patched = apply_tar_to_modules(ours, TARConfig.from_preset(preset), select=videocrafter2_select(ours))
    theirs_by_name, ours_by_name = dict(theirs.named_modules()), dict(ours.named_modules())
    names = [f"{parent}.transformer_blocks.0.{attn}" for parent in ROWS for attn in ("attn1", "attn2")]
    assert sorted(patched) == sorted(f"{parent}.transformer_blocks.0.{attn}" for width in settings[
        "regularize_res_list"] for parent in LEVELS[str(width)] for attn in ("attn1", "attn2"))
    generator = torch.Generator().manual_seed(1)
    regularized = set()
    for step in (0, settings["until_time"], settings["until_time"] + 1, 24):
        set_step(ours, step)
        for name in names:
            x = torch.randn(ROWS[name.split(".transformer_blocks")[0]], FRAMES, HEADS * HEAD_DIM,
                            generator=generator, dtype=torch.float64)
            with torch.no_grad():
                expected = theirs_by_name[name](x, time_index=step)
                got = ours_by_name[name](x, time_index=step)  # as VSTAR's lvdm calls it
                plain = ours_by_name[name].to_out(torch.nn.functional.scaled_dot_product_attention(
                    *(proj(x).unflatten(-1, (HEADS, -1)).transpose(1, 2) for proj in
                      (ours_by_name[name].to_q, ours_by_name[name].to_k, ours_by_name[name].to_v))
                ).transpose(1, 2).flatten(2))
            assert (got - expected).abs().max().item() <= TOLERANCE, (preset, step, name)
            if (expected - plain).abs().max() > 1e-6:
                regularized.add((step, name.split(".transformer_blocks")[0]))
    want = {(step, parent) for step in (0, settings["until_time"]) for width in settings["regularize_res_list"]
            for parent in LEVELS[str(width)]}
    assert regularized == want
