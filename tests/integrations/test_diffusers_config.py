"""TARConfig, presets, the processor's interface, the step tracker, and the optional-import contract."""

import copy
import dataclasses
import importlib.metadata
import inspect
import math
import pathlib
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from vstar_kernels import cli
from vstar_kernels import LevelSpec, PRESETS, TARConfig, gaussian_toeplitz
from vstar_kernels.diffusers import TARAttnProcessor, apply_tar
from vstar_kernels.diffusers.steps import StepTracker

from .tiny_dit_models import FAMILIES as DIT_FAMILIES
from .tiny_video_models import FAMILIES as UNET_FAMILIES

PAPER_PRESETS = ["64D1", "64D4", "64D8", "64D1_32D8", "64D1_32D1", "64D1_32D12", "64D4_32D8", "64D4_32D12"]


def test_presets_are_the_papers():
    assert sorted(PRESETS) == sorted(PAPER_PRESETS)
    cfg = TARConfig.from_preset("64D1_32D12")
    assert cfg.levels == {0: LevelSpec(1.0, 1.0), 1: LevelSpec(12.0, 1.0)}
    assert (cfg.until_step, cfg.include_input_block, cfg.backend) == (13, False, "auto")
    with pytest.raises(ValueError, match="unknown TAR preset '64D2'.*64D1, 64D4, 64D8, 64D1_32D8"):
        TARConfig.from_preset("64D2")


def test_config_fields_can_be_changed_for_a_preset():
    cfg = dataclasses.replace(TARConfig.from_preset("64D1"), backend="triton")
    assert cfg.backend == "triton" and cfg.levels == {0: LevelSpec(1.0, 1.0)}
    assert TARConfig.from_preset("64D4", until_step=None, backend="reference").until_step is None


def test_a_config_remembers_its_preset():
    assert TARConfig.from_preset("64D4", backend="reference").preset == "64D4"
    assert dataclasses.replace(TARConfig.from_preset("64D1"), backend="triton").preset == "64D1"
    assert TARConfig(levels={0: (1.0, 1.0)}).preset is None
    with pytest.raises(ValueError, match=r"preset must be None or one of VSTAR's presets \(64D1, .*got '64D2'"):
        TARConfig(levels={0: (1.0, 1.0)}, preset="64D2")


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_a_dit_refuses_a_unet_preset(preset):
    """VSTAR's presets are for video UNets; on a DiT a preset config raises, naming the preset and
    what to give instead; the same levels given as levels are taken, and a UNet takes the preset."""
    model = DIT_FAMILIES["wan"].model()
    with pytest.raises(ValueError, match=rf"'{preset}' is a VSTAR preset for video UNets and WanTransformer3DModel "
                                         r"is a video DiT.*levels=\{0: \(sigma, strength\)\} with sigma in latent "
                                         "frames"):
        apply_tar(model, TARConfig.from_preset(preset))
    assert not model._forward_pre_hooks, "a refused apply_tar left a hook"
    assert apply_tar(model, TARConfig(levels={0: TARConfig.from_preset(preset).levels[0]})) == \
        DIT_FAMILIES["wan"].modules
    assert apply_tar(UNET_FAMILIES["unet3d"].model(), TARConfig.from_preset(preset))


def test_levels_take_pairs_or_level_specs():
    cfg = TARConfig(levels={1: [8.0, 0.5], 0: LevelSpec(sigma=math.inf)})
    assert list(cfg.levels) == [0, 1]
    assert cfg.levels[1] == LevelSpec(8.0, 0.5)
    assert not cfg.levels[0].active and not LevelSpec(1.0, 0.0).active and LevelSpec(2.0, -1.0).active


ONE = {0: (1.0, 1.0)}
BAD_CONFIGS = [
    pytest.param(dict(levels=[(1.0, 1.0)]), TypeError, "levels must be a mapping", id="levels-list"),
    pytest.param(dict(levels={}), ValueError, "at least one level", id="levels-empty"),
    pytest.param(dict(levels={-1: (1.0, 1.0)}), ValueError, "levels keys must be ints >= 0", id="level-negative"),
    pytest.param(dict(levels={True: (1.0, 1.0)}), ValueError, "levels keys must be ints >= 0", id="level-bool"),
    pytest.param(dict(levels={"64": (1.0, 1.0)}), ValueError, "levels keys must be ints >= 0", id="level-name"),
    pytest.param(dict(levels={0: 1.0}), TypeError, r"levels\[0\] must be a \(sigma, strength\) pair", id="spec-number"),
    pytest.param(dict(levels={0: (1.0, 1.0, 1.0)}), TypeError, r"levels\[0\] must be a \(sigma, strength\) pair",
                 id="spec-triple"),
    pytest.param(dict(levels={0: (0.0, 1.0)}), ValueError, r"levels\[0\]: sigma must be > 0", id="sigma-zero"),
    pytest.param(dict(levels={2: (1.0, math.nan)}), ValueError, r"levels\[2\]: strength must be finite",
                 id="strength-nan"),
    pytest.param(dict(levels={0: (1.0, "1")}), TypeError, r"levels\[0\]: strength must be a real number",
                 id="strength-str"),
    pytest.param(dict(levels=ONE, until_step=-1), ValueError, "until_step must be an int >= 0 or None",
                 id="until-negative"),
    pytest.param(dict(levels=ONE, until_step=True), ValueError, "until_step must be an int >= 0 or None",
                 id="until-bool"),
    pytest.param(dict(levels=ONE, include_input_block=1), TypeError, "include_input_block must be a bool",
                 id="input-block-int"),
    pytest.param(dict(levels=ONE, backend="flash"), ValueError, "backend must be one of", id="backend"),
    pytest.param(dict(levels={0: (None, 0.5)}), TypeError, r"levels\[0\]: a pair's first entry is sigma",
                 id="sigma-none"),  # was sigma 1.0 without a word
    pytest.param(dict(levels={0: (np.eye(4), 0.5)}), TypeError,
                 r"levels\[0\]: a pair's first entry is sigma \(a number\) or a delta \(a torch.Tensor\), got "
                 r"numpy.ndarray", id="delta-numpy"),  # was "sigma must be a real number"
    pytest.param(dict(levels={0: {"sigma": 2.0, "strength": 1.0}}), TypeError,
                 r"^levels\[0\] must be a \(sigma, strength\) pair, a \(delta, strength\) pair or a LevelSpec, got "
                 r"\{'sigma': 2.0, 'strength': 1.0\}$", id="level-dict"),  # its keys read as the pair: "got str"
    pytest.param(dict(levels=ONE, preset=["64D1"]), ValueError, "preset must be None or one of", id="preset-list"),
    pytest.param(dict(levels={3: (5.0, 7.0)}, preset="64D1"), ValueError, "these are not its levels",
                 id="preset-other-levels"),  # was accepted, labelled as the VSTAR preset
]


@pytest.mark.parametrize("kwargs, error, match", BAD_CONFIGS)
def test_bad_config_raises_naming_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        TARConfig(**kwargs)


def test_numpy_ints_are_ints_and_from_preset_keeps_its_preset():
    cfg = TARConfig(levels={np.int64(1): (8.0, 1.0)}, until_step=np.int64(13))
    assert cfg == TARConfig(levels={1: (8.0, 1.0)}, until_step=13)
    assert type(cfg.until_step) is int and [type(level) for level in cfg.levels] == [int]
    for changes in (dict(preset="64D4"), dict(levels=ONE)):
        with pytest.raises(ValueError, match=f"from_preset: {next(iter(changes))} come from the preset '64D1'"):
            TARConfig.from_preset("64D1", **changes)
    assert TARConfig.from_preset("64D1", until_step=5).until_step == 5


def test_step_gate():
    cfg = TARConfig(levels={0: (1.0, 1.0)}, until_step=13)
    assert [cfg.regularizes(s) for s in (0, 13, 14)] == [True, True, False]
    assert [type(cfg.regularizes(np.int64(s))) for s in (0, 14)] == [bool, bool]  # not numpy's bool
    assert TARConfig(levels={0: (1.0, 1.0)}, until_step=None).regularizes(10 ** 6)
    for bad in (None, -5, True, 1.5):  # None raised a bare TypeError; -5 and True were steps
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            cfg.regularizes(bad)


def test_a_config_s_levels_are_read_only_and_it_copies():
    """The frozen config's levels could be changed in place (its hash did not follow, nothing was checked: a level
    of "anything" failed at the model's forward); they are read-only. Pickle and deepcopy give an equal config of
    equal hash, a frame matrix's level too; the repr shows the levels as a dict."""
    cfg = TARConfig(levels={0: (gaussian_toeplitz(4, 1.0), 1.0), 1: (8.0, 0.5)}, until_step=3)
    with pytest.raises(TypeError, match="does not support item assignment"):
        cfg.levels[1] = "anything"
    for copied in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg)):
        assert copied == cfg and hash(copied) == hash(cfg) and copied.levels[1] == LevelSpec(8.0, 0.5)
    assert repr(cfg).startswith("TARConfig(levels={0: LevelSpec(") and "until_step=3" in repr(cfg)


def test_a_preset_s_label_follows_its_levels():
    """preset names where the levels came from: a replace that keeps the levels keeps it; one that changes them
    must drop it (the config would be labelled, and refused on a DiT, as the VSTAR preset it is not)."""
    cfg = TARConfig.from_preset("64D1_32D8")
    assert dataclasses.replace(cfg, until_step=3).preset == "64D1_32D8"
    with pytest.raises(ValueError, match="preset='64D1_32D8' names the VSTAR preset"):
        dataclasses.replace(cfg, levels={0: (1.0, 1.0)})
    assert dataclasses.replace(cfg, levels={0: (1.0, 1.0)}, preset=None).preset is None
    with pytest.raises(ValueError, match=r"unknown TAR preset \['64D1'\]"):
        TARConfig.from_preset(["64D1"])


def test_processor_interface_is_what_diffusers_expects():
    TARAttnProcessor()  # diffusers re-creates processors with cls() (IP adapters)
    params = inspect.signature(TARAttnProcessor.__call__).parameters
    assert list(params) == ["self", "attn", "hidden_states", "encoder_hidden_states", "attention_mask", "temb"]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params.values())


def test_step_tracker_counts_forward_calls_and_is_shared_by_owners():
    model = torch.nn.Linear(2, 2)
    runs = []
    tracker = StepTracker.attach(model, "a", on_run_start=lambda: runs.append("a"))
    seen = []
    assert StepTracker.attach(model, "b", before_forward=lambda: seen.append(("b", tracker.step))) is tracker
    assert StepTracker.of(model) is tracker
    model.register_forward_pre_hook(lambda m, args: seen.append(tracker.step))
    for _ in range(3):
        model(torch.zeros(2))
    tracker.reset()
    model(torch.zeros(2))
    assert seen == [("b", 0), 0, ("b", 1), 1, ("b", 2), 2, ("b", 0), 0] and runs == ["a"]
    StepTracker.detach(model, "a")
    assert StepTracker.of(model) is tracker and len(model._forward_pre_hooks) == 2
    StepTracker.detach(model, "b")
    assert StepTracker.of(model) is None and len(model._forward_pre_hooks) == 1


def test_step_tracker_restarts_when_the_scheduler_gets_new_timesteps():
    class Pipe:
        scheduler = DDIMScheduler()

    model = torch.nn.Linear(2, 2)
    pipe = Pipe()
    pipe.scheduler.set_timesteps(5)
    tracker = StepTracker.attach(model, "a", pipeline=pipe)
    steps = []
    for call in range(7):
        if call in (2, 5):
            pipe.scheduler.set_timesteps(5)
        model(torch.zeros(2))
        steps.append(tracker.step)
    assert steps == [0, 1, 0, 1, 2, 0, 1]
    pipe.scheduler = DDIMScheduler()  # a replaced scheduler: its timesteps are new too
    model(torch.zeros(2))
    assert tracker.step == 0


def test_import_contract_without_diffusers():
    """`import vstar_kernels` never imports diffusers; without it, vstar_kernels.diffusers names the extra."""
    code = textwrap.dedent("""
        import sys
        import vstar_kernels
        assert "diffusers" not in sys.modules, "import vstar_kernels imported diffusers"
        sys.modules["diffusers"] = None  # as if it were not installed
        try:
            import vstar_kernels.diffusers
        except ImportError as exc:
            print(exc)
        else:
            raise SystemExit("imported without diffusers")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    checkout = pathlib.Path(__file__).resolve().parents[2]
    assert f'install the diffusers extra with: pip install -e "{checkout}[diffusers]"' in res.stdout


def test_info_shows_the_diffusers_version(capsys):
    assert cli.main(["info"]) == 0
    assert f"diffusers     {importlib.metadata.version('diffusers')}" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["TARConfig", "LevelSpec", "PRESETS"])
def test_the_config_is_public_from_the_package_and_its_old_home_warns(name):
    import vstar_kernels
    import vstar_kernels.diffusers as front_end

    with pytest.warns(DeprecationWarning, match=f"vstar_kernels.diffusers.{name} is deprecated.*vstar_kernels.{name}"):
        assert getattr(front_end, name) is getattr(vstar_kernels, name)


def test_the_presets_cannot_be_changed_in_place():
    """A preset written in place changed every config built from it later (from_preset then refused sigma 0)."""
    import copy
    import json
    import pickle

    for change in (lambda: PRESETS["64D1"].__setitem__(0, 0.0), lambda: PRESETS.__setitem__("64D9", {0: 9.0}),
                   lambda: PRESETS["64D1"].update({0: 0.0}), lambda: PRESETS.pop("64D1")):
        with pytest.raises(TypeError, match=r"PRESETS is read-only: change a copy, e.g. dict\(PRESETS\[name\]\)"):
            change()
    assert PRESETS["64D1_32D8"] == {0: 1.0, 1: 8.0} and TARConfig.from_preset("64D1").levels[0].sigma == 1.0
    # a copy is a plain dict to change, and PRESETS pickles and dumps as one
    mine = copy.deepcopy(PRESETS["64D1"])
    mine[0] = 2.0
    assert PRESETS["64D1"] == {0: 1.0} and type(copy.copy(PRESETS)) is dict
    assert pickle.loads(pickle.dumps(PRESETS)) == PRESETS and json.loads(json.dumps(PRESETS["64D1"])) == {"0": 1.0}
