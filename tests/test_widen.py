"""train.widen: the widened network computes what the narrow one computes, and can learn."""
import json

import pytest
import torch

from infer.weights import load_model
from tinymodel import IN_CHANNELS, TINY_PATCH, make_artifact, make_release_folder, tiny_arch
from train.widen import main, wider_architecture, widen

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(seed=0, batch=2):
    return torch.randn(batch, IN_CHANNELS, *TINY_PATCH, generator=torch.Generator().manual_seed(seed))


def _logits(path, x):
    net, card = load_model(path)
    with torch.no_grad():
        return net(x), card


@pytest.mark.parametrize("factor", [2, 3])
def test_the_wide_network_computes_the_narrow_ones_output(tmp_path, factor):
    src = make_artifact(tmp_path / "narrow", seed=21)
    assert main([str(src), str(tmp_path / "wide"), "--factor", str(factor), "--seed", "4"]) == 0
    x = _x()
    narrow, card = _logits(src, x)
    wide, wide_card = _logits(tmp_path / "wide", x)
    assert wide_card.architecture["features_per_stage"] == [f * factor for f in tiny_arch()["features_per_stage"]]
    assert {k: v for k, v in wide_card.architecture.items() if k != "features_per_stage"} == \
        {k: v for k, v in card.architecture.items() if k != "features_per_stage"}
    assert wide_card.patch_size == card.patch_size and wide_card.box_style == card.box_style
    assert wide_card.source.endswith(f"widened x{factor} (python -m train.widen, seed 4)")
    n_narrow = sum(v.numel() for v in load_model(src)[0].parameters())
    n_wide = sum(v.numel() for v in load_model(tmp_path / "wide")[0].parameters())
    assert n_wide > 0.8 * factor ** 2 * n_narrow  # conv weights grow with in x out channels
    assert narrow.abs().max() > 0.1  # a network that outputs something, so equality means something
    torch.testing.assert_close(wide, narrow, rtol=1e-4, atol=1e-4)


def test_a_release_folder_widens_too_and_the_policy_can_be_set(tmp_path):
    make_release_folder(tmp_path / "dl", nested="nnInteractive_v1.0", seed=22)
    assert main([str(tmp_path / "dl"), str(tmp_path / "wide"), "--policy", "reference,mirror=on"]) == 0
    raw = json.loads((tmp_path / "wide" / "model_card.json").read_text())
    assert raw["policy"] == "reference,mirror=on"
    # the converted release (same weights, narrow) gives the same logits
    from infer.convert import convert
    convert(tmp_path / "dl", tmp_path / "narrow")
    x = _x(1)
    torch.testing.assert_close(_logits(tmp_path / "wide", x)[0], _logits(tmp_path / "narrow", x)[0],
                               rtol=1e-4, atol=1e-4)


def test_the_new_channels_learn(tmp_path):
    """Zero-extension must not leave dead channels: after one optimizer step the weights that read
    new channels are no longer all zero, and the output moves away from the narrow network's."""
    src = make_artifact(tmp_path / "narrow", seed=23)
    widen(src, tmp_path / "wide", 2, seed=1)
    net, _ = load_model(tmp_path / "wide")
    net.train().requires_grad_(True)
    key = "decoder.stages.0.convs.0.conv.weight"  # reads [up-sampled, skip], each half widened
    w = dict(net.named_parameters())[key]
    half, old = w.shape[1] // 2, tiny_arch()["features_per_stage"][-2]  # the skip's old width
    new_inputs = torch.cat([w[:, old:half], w[:, half + old:]], dim=1).detach()
    assert float(new_inputs.abs().max()) == 0.0
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, target = _x(2), torch.randint(0, 2, (2, *TINY_PATCH), generator=torch.Generator().manual_seed(3))
    torch.nn.functional.cross_entropy(net(x), target).backward()
    opt.step()
    new_inputs = torch.cat([w[:, old:half], w[:, half + old:]], dim=1).detach()
    assert float(new_inputs.abs().max()) > 0.0
    net.eval()
    with torch.no_grad():
        moved = net(x)
    narrow, _ = _logits(src, x)
    assert float((moved - narrow).abs().max()) > 1e-3


def test_factor_one_is_the_same_network_and_bad_factors_are_refused(tmp_path, capsys):
    src = make_artifact(tmp_path / "narrow", seed=24)
    widen(src, tmp_path / "same", 1)
    a, b = load_model(src)[0].state_dict(), load_model(tmp_path / "same")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main([str(src), str(tmp_path / "bad"), "--factor", "0"]) == 1
    assert "factor must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError):
        wider_architecture(tiny_arch(), True)
    assert main([str(src), str(src)]) == 1  # would overwrite its own source
    assert "is the source folder" in capsys.readouterr().err
    assert load_model(src)[0].state_dict().keys() == a.keys()
