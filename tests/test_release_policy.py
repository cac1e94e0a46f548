"""The release preset and gated last-click mirroring (infer.policy, infer.engine.Engine.gated)."""
import dataclasses

import pytest
import torch

from infer.card import ModelCard
from infer.engine import Engine
from infer.geometry import make_crop
from infer.policy import PRESETS, Policy, gated_flips, parse_policy
from infer.case import Case
from infer.prompts import ClassPrompts
from scripts.tinymodel import IN_CHANNELS, tiny_arch

PATCH = (4, 8, 8)


def test_release_is_reference_with_probability_merge_only():
    ref, rel = PRESETS["reference"], PRESETS["release"]
    differ = {f.name for f in dataclasses.fields(Policy) if getattr(ref, f.name) != getattr(rel, f.name)}
    assert differ == {"name", "upsample", "merge"}
    assert (rel.upsample, rel.merge) == ("prob", "prob") and rel.mirror_last is False
    assert parse_policy("release,mirror_last=on").mirror_last is True


def test_gated_flips_only_from_the_last_click_stage_and_only_without_mirroring():
    p = PRESETS["release"].replace(mirror_last=True, mirror_axes="yx")
    assert gated_flips(p, 4) is None and gated_flips(p, 0) is None
    assert gated_flips(p, 5) == [(), (3,), (4,), (3, 4)]      # identity first; dims of (B, C, Z, Y, X)
    assert gated_flips(p.replace(last_click=3), 3) == [(), (3,), (4,), (3, 4)]
    assert gated_flips(p.replace(mirror=True), 5) is None      # already mirrored at every view
    assert gated_flips(PRESETS["release"], 5) is None          # knob off
    with pytest.raises(ValueError):
        Policy(mirror_gate=1.5)
    with pytest.raises(ValueError):
        Policy(last_click=0)


def test_the_stage_is_the_length_of_clicks_order():
    imgs = torch.zeros(8, 8, 8).numpy()
    case = {"imgs": imgs, "clicks": [{"fg": [[1, 1, 1]] * 3, "bg": [[2, 2, 2]] * 2}],
            "clicks_order": [["fg", "bg", "fg", "bg", "fg"]]}
    assert Case.from_mapping(case).prompts(1, "2d").stage == 5
    case["clicks_order"] = [["fg", "bg", None]]
    assert Case.from_mapping(case).prompts(1, "2d").stage == 3
    assert Case.from_mapping({"imgs": imgs, "boxes": [{"z_mid": 2, "z_mid_y_min": 1, "z_mid_y_max": 3,
                                                     "z_mid_x_min": 1, "z_mid_x_max": 3}]}).prompts(1, "2d").stage == 0


class FixedLogits(torch.nn.Module):
    """Ignores its input's values: foreground logit ``fg[z, y, x]`` against 0, so a flipped input
    gives this map flipped back, i.e. the mirror image of ``fg``."""

    def __init__(self, fg: torch.Tensor):
        super().__init__()
        self.fg = fg

    def forward(self, x):
        return torch.stack([torch.zeros_like(self.fg), self.fg])[None]


def _p(fg):
    """The probability the engine computes from logits (0, fg): a two-class softmax."""
    return torch.softmax(torch.stack([torch.zeros_like(fg), fg]), 0)[1]


def _engine(fg):
    card = ModelCard(architecture=tiny_arch(), input_channels=IN_CHANNELS, num_classes=2, patch_size=PATCH)
    return Engine(FixedLogits(fg), card, torch.device("cpu"))


def _forward(engine, flips, agreement):
    image = torch.zeros(PATCH)
    crop = make_crop([2, 4, 4], 1.0, PATCH)
    with engine.gated(flips, agreement):
        out = engine.forward(image, ClassPrompts(clicks=[(True, (2, 4, 4))]), None, crop)
    assert engine.gate is None  # only inside the block
    return out


def test_gate_keeps_the_mean_when_the_masks_agree():
    # a block symmetric in x (x = 2..5 of 8), more certain on its left half: p = sigmoid(fg)
    fg = torch.full(PATCH, -10.0)
    fg[:, :, 2:4], fg[:, :, 4:6] = 2.0, 1.0
    engine = _engine(fg)
    out = _forward(engine, [(), (4,)], 0.9)
    s2, s1 = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(1.0))
    assert torch.allclose(out[:, :, 2:6], ((s2 + s1) / 2).expand(4, 8, 4))  # the mean of the two
    assert engine.events[-1]["kept"] == "mean" and engine.events[-1]["dice"] == 1.0


def test_gate_keeps_the_plain_prediction_when_the_masks_disagree():
    # the object on the left half only: its mirror image lies on the right half, the mean is 0.5
    # everywhere (mask empty), Dice(mean, plain) = 0 < 0.9
    fg = torch.full(PATCH, -10.0)
    fg[:, :, :4] = 10.0
    engine = _engine(fg)
    out = _forward(engine, [(), (4,)], 0.9)
    assert torch.equal(out, _p(fg))
    assert engine.events[-1]["kept"] == "plain" and engine.events[-1]["dice"] == 0.0
    # with no threshold to pass, the mean is kept
    assert torch.allclose(_forward(engine, [(), (4,)], 0.0), torch.full(PATCH, 0.5), atol=1e-4)


def test_no_gate_no_change():
    fg = torch.randn(PATCH)
    engine = _engine(fg)
    assert torch.equal(_forward(engine, None, 0.9), _p(fg))
    assert engine.events == []


def test_a_release_folder_runs_the_release_preset(tmp_path):
    from infer.predictor import Predictor
    from infer.weights import load_model
    from scripts.tinymodel import make_release_folder
    net, card = load_model(make_release_folder(tmp_path / "rel"))
    assert card.policy == "release"
    assert Predictor(net, card, torch.device("cpu")).policy == PRESETS["release"]
