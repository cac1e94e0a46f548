"""infer.convert and infer.card: release -> artifact round trip, sha256, card validation."""
import hashlib
import json

import pytest
import torch

from infer.card import CardError, ModelCard
from infer.convert import convert, main, write_artifact
from infer.weights import WeightsError, load_model
from tinymodel import IN_CHANNELS, TINY_PATCH, make_artifact, make_release_folder, tiny_arch, tiny_network


def _x(seed=0):
    return torch.randn(1, IN_CHANNELS, *TINY_PATCH, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_cli_release_to_artifact_round_trip(tmp_path, capsys):
    make_release_folder(tmp_path / "dl", nested="nnInteractive_v1.0", seed=11)
    dst = tmp_path / "art"
    assert main([str(tmp_path / "dl"), str(dst), "--demo"]) == 0
    printed = capsys.readouterr().out
    assert str(dst / "weights.pt") in printed and str(dst / "model_card.json") in printed
    assert sorted(p.name for p in dst.iterdir()) == ["model_card.json", "weights.pt"]  # no temp files

    raw = json.loads((dst / "model_card.json").read_text())
    assert raw["format"] == "nnint-card/1"
    assert raw["weights_sha256"] == hashlib.sha256((dst / "weights.pt").read_bytes()).hexdigest()
    assert raw["patch_size"] == list(TINY_PATCH) and raw["input_channels"] == 8
    assert raw["num_classes"] == 2 and raw["box_style"] == "2d" and raw["demo"] is True
    assert raw["architecture"]["features_per_stage"] == tiny_arch()["features_per_stage"]
    assert raw["click_radius"] == 4 and raw["prompt_decay"] == 0.9
    assert raw["normalization"] == "zscore_nonzero_bbox" and raw["weights_file"] == "weights.pt"

    sd = torch.load(dst / "weights.pt", weights_only=True)  # a plain dict of tensors
    assert isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())
    assert set(sd) == set(tiny_network(seed=11).state_dict())

    net, card = load_model(dst)
    with torch.no_grad():
        want = tiny_network(seed=11)(_x())
        torch.testing.assert_close(net(_x()), want, atol=0, rtol=0)
    assert card.demo is True and card.box_style == "2d"


def test_tampered_weights_are_detected(tmp_path):
    art = make_artifact(tmp_path / "art", seed=12)
    sd = torch.load(art / "weights.pt", weights_only=True)
    key = "decoder.seg_layers.2.bias"
    sd[key] = sd[key] + 1.0
    torch.save(sd, art / "weights.pt")
    with pytest.raises(WeightsError, match="sha256"):
        load_model(art)
    net, _ = load_model(art, verify=False)  # loads when asked not to check, and differs
    with torch.no_grad():
        assert not torch.allclose(net(_x()), tiny_network(seed=12)(_x()))


def test_artifact_to_artifact_overrides_box_style_and_keeps_the_rest(tmp_path):
    src = make_artifact(tmp_path / "a", seed=13, demo=False, click_radius=3, prompt_decay=0.8)
    dst = convert(src, tmp_path / "b", box_style="3d")
    a, b = ModelCard.load(src), ModelCard.load(dst)
    assert b.box_style == "3d" and a.box_style == "2d"
    assert (b.click_radius, b.prompt_decay, b.demo, b.patch_size) == (3, 0.8, False, TINY_PATCH)
    assert b.architecture == a.architecture and b.source == a.source


def test_convert_refuses_bad_sources(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    assert "error" in capsys.readouterr().err
    src = make_artifact(tmp_path / "a")
    with pytest.raises(WeightsError, match="source folder"):
        convert(src, src)


# ---- model card -------------------------------------------------------------------------------

def _card(**over):
    d = dict(architecture=tiny_arch(), input_channels=8, num_classes=2, patch_size=[16, 32, 32])
    d.update(over)
    return d


def test_card_round_trip(tmp_path):
    card = ModelCard(**_card(box_style="3d", demo=True, source="x"))
    card.save(tmp_path)
    assert ModelCard.load(tmp_path / "model_card.json") == card
    assert json.loads((tmp_path / "model_card.json").read_text())["channels"][0] == "image"


@pytest.mark.parametrize("over, words", [
    ({"box_style": "2.5d"}, "box_style"),
    ({"input_channels": 7}, "channels"),
    ({"channels": ["image", "prev_mask", "box+", "box-", "point+", "point-", "scribble+", "lasso"]},
     "channels"),
    ({"prompt_decay": 1.5}, "prompt_decay"),
    ({"click_radius": 0}, "click_radius"),
    ({"patch_size": [16, 32]}, "patch_size"),
    # tiny_arch's total strides are (4, 8, 8): 20 along y leaves the skips misaligned
    ({"patch_size": [16, 20, 32]}, r"axis 1 \(20\) is not a multiple of the network's total stride 8"),
    ({"patch_size": [6, 32, 32]}, r"axis 0 \(6\) is not a multiple of the network's total stride 4"),
    ({"normalization": "minmax"}, "normalization"),
    ({"weights_file": "../../etc/passwd"}, "weights_file"),
    ({"weights_sha256": "abc"}, "weights_sha256"),
    ({"format": "nnint-card/2"}, "format"),
    ({"architecture": dict(tiny_arch(), norm_op="torch.nn.BatchNorm3d")}, "norm_op"),
])
def test_card_validation_errors_name_the_field(over, words):
    with pytest.raises(CardError, match=words):
        ModelCard.from_dict(_card(**over))


def test_card_unknown_or_missing_fields(tmp_path):
    with pytest.raises(CardError, match="unknown model card fields.*colour"):
        ModelCard.from_dict(_card(colour="red"))
    with pytest.raises(CardError, match="missing.*num_classes"):
        ModelCard.from_dict({k: v for k, v in _card().items() if k != "num_classes"})
    (tmp_path / "model_card.json").write_text("{not json")
    with pytest.raises(CardError, match="cannot read"):
        ModelCard.load(tmp_path)


def test_patch_and_policy_overrides_keep_the_weights(tmp_path, capsys):
    src = make_artifact(tmp_path / "a", seed=14)
    dst = tmp_path / "b"
    assert main([str(src), str(dst), "--patch", "12", "24", "40", "--policy", "reference,mirror=on"]) == 0
    card = ModelCard.load(dst)
    assert card.patch_size == (12, 24, 40) and card.policy == "reference,mirror=on"
    assert (dst / "weights.pt").read_bytes() == (src / "weights.pt").read_bytes()
    # the same network at the new patch: fully convolutional, so the logits are the source's
    x = torch.randn(1, IN_CHANNELS, 12, 24, 40, generator=torch.Generator().manual_seed(1))
    a, _ = load_model(src)
    b, _ = load_model(dst)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert main([str(src), str(tmp_path / "c"), "--patch", "32"]) == 0
    assert ModelCard.load(tmp_path / "c").patch_size == (32, 32, 32)


@pytest.mark.parametrize("args, message", [
    (["--patch", "6"], "not a multiple of the network's total stride 4"),  # z: strides 1*1*2*2
    (["--patch", "16", "20", "32"], "axis 1 (20) is not a multiple of the network's total stride 8"),
    (["--policy", "bogus"], "unknown policy preset 'bogus'"),
])
def test_bad_patch_or_policy_is_refused_and_nothing_is_written(tmp_path, capsys, args, message):
    src = make_artifact(tmp_path / "a", seed=15)
    assert main([str(src), str(tmp_path / "out")] + args) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_card_edited_by_hand_with_a_bad_patch_is_refused_at_load(tmp_path):
    src = make_artifact(tmp_path / "a", seed=16)
    path = src / "model_card.json"
    raw = json.loads(path.read_text())
    raw["patch_size"] = [16, 20, 32]
    path.write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match=r"axis 1 \(20\) is not a multiple"):
        load_model(src)


def _unique_bytes(sd):
    """Bytes of the distinct storages of a state dict (what torch.save must write at least)."""
    seen = {}
    for v in sd.values():
        seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(seen.values())


def test_aliases_saved_as_copies_are_stored_once(tmp_path):
    # The network registers each parameter under up to 4 keys (conv / all_modules.0, encoder /
    # decoder.encoder). A state dict copied key by key (what `v.cpu()` per key does on a GPU)
    # holds separate copies: the artifact must still store each parameter once.
    net = tiny_network(seed=21)
    shared = net.state_dict()
    copies = {k: v.clone() for k, v in shared.items()}
    assert _unique_bytes(copies) > 3 * _unique_bytes(shared)  # the aliasing this test is about
    card = ModelCard(**_card(box_style="2d", demo=True))
    write_artifact(tmp_path / "copies", copies, card)
    size = (tmp_path / "copies" / "weights.pt").stat().st_size
    assert size < 1.1 * _unique_bytes(shared) + 64 * 1024, (size, _unique_bytes(shared))
    assert list(torch.load(tmp_path / "copies" / "weights.pt", weights_only=True)) == list(copies)
    loaded, _ = load_model(tmp_path / "copies")
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), net(_x()), atol=0, rtol=0)


def test_aliases_compare_by_bits_and_dtype(tmp_path):
    # a NaN copied is the same value (torch.equal would call it different); a copy in another
    # dtype is not the same parameter
    net = tiny_network(seed=23)
    shared = net.state_dict()
    sd = {k: v.clone() for k, v in shared.items()}
    key = next(k for k in sd if k.endswith(".conv.weight"))
    group = [k for k in shared if shared[k].data_ptr() == shared[key].data_ptr()]  # its aliases
    assert len(group) > 1
    for k in group:
        sd[k].view(-1)[0] = float("nan")
    twin = group[1]
    card = ModelCard(**_card(box_style="2d", demo=True))
    write_artifact(tmp_path / "nan", sd, card)
    sd[twin] = sd[twin].half()
    with pytest.raises(WeightsError, match="hold different values"):
        write_artifact(tmp_path / "dtype", sd, card)


def test_aliases_with_different_values_are_refused(tmp_path):
    net = tiny_network(seed=22)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    key = next(k for k in sd if ".all_modules.0.weight" in k)
    sd[key] = sd[key] + 1.0
    card = ModelCard(**_card(box_style="2d", demo=True))
    with pytest.raises(WeightsError, match="aliased entries .* hold different values"):
        write_artifact(tmp_path / "bad", sd, card)
    assert not (tmp_path / "bad" / "weights.pt").exists()
