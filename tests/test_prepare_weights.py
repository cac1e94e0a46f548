"""scripts/prepare_weights.py on a generated tiny nnInteractive-layout release: converted with
`python -m infer.convert`, sha256s recorded, loadable; the hub path with a stand-in module."""
import hashlib
import json
import sys
import types

import pytest
import torch

from infer.weights import load_model
from scripts import prepare_weights
from tests.tinymodel import make_release_folder, tiny_network


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_local_release_converted_and_recorded(tmp_path, capsys):
    release = make_release_folder(tmp_path / "download", nested="nnInteractive_v1.0")
    dst = tmp_path / "weights" / "nninteractive_v1.0"
    assert prepare_weights.main(["--source", str(tmp_path / "download"), "--dst", str(dst)]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["model_card.json", "provenance.json", "weights.pt"]
    record = json.loads((dst / "provenance.json").read_text())
    card = json.loads((dst / "model_card.json").read_text())
    assert record["source"] == {"local_folder": str(release)}
    assert record["release_sha256"]["fold_0/checkpoint_final.pth"] == _sha(release / "fold_0" / "checkpoint_final.pth")
    assert record["release_sha256"]["plans.json"] == _sha(release / "plans.json")
    assert record["weights_sha256"] == card["weights_sha256"] == _sha(dst / "weights.pt")
    assert card["demo"] is False and card["box_style"] == "2d"
    assert record["weights_sha256"] in capsys.readouterr().out
    # The artifact loads (sha256 verified) and holds the release's network, tensor for tensor.
    net, _ = load_model(dst, "cpu")
    ref = tiny_network(seed=0).state_dict()
    got = net.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert not list(dst.parent.glob(".*tmp*"))


@pytest.mark.slow
def test_existing_destination_needs_force(tmp_path):
    make_release_folder(tmp_path / "rel")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old").write_text("x")
    assert prepare_weights.main(["--source", str(tmp_path / "rel"), "--dst", str(dst)]) == 1
    assert (dst / "old").exists()
    assert prepare_weights.main(["--source", str(tmp_path / "rel"), "--dst", str(dst), "--force",
                                 "--box-style", "3d"]) == 0
    assert not (dst / "old").exists()
    assert json.loads((dst / "model_card.json").read_text())["box_style"] == "3d"


def test_expected_sha256_is_enforced(tmp_path, capsys):
    make_release_folder(tmp_path / "rel")
    rc = prepare_weights.main(["--source", str(tmp_path / "rel"), "--dst", str(tmp_path / "o"),
                               "--expect-sha256", "0" * 64])
    assert rc == 1 and "expected" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_not_a_release(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert prepare_weights.main(["--source", str(tmp_path / "empty"), "--dst", str(tmp_path / "o")]) == 1
    assert "not an nnInteractive release folder" in capsys.readouterr().err


@pytest.mark.slow
def test_hub_download_path(tmp_path, monkeypatch):
    """The download branch, with a stand-in huggingface_hub that 'downloads' a tiny release."""
    calls = {}

    class Info:
        sha = "c0ffee" * 6 + "c0ff"

    class HfApi:
        def model_info(self, repo_id, revision=None):
            calls["model_info"] = (repo_id, revision)
            return Info()

    def snapshot_download(repo_id, revision, allow_patterns, local_dir):
        calls["snapshot_download"] = (repo_id, revision, allow_patterns)
        make_release_folder(local_dir, nested="nnInteractive_v1.0")
        return local_dir

    hub = types.ModuleType("huggingface_hub")
    hub.HfApi, hub.snapshot_download = HfApi, snapshot_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    dst = tmp_path / "w"
    assert prepare_weights.main(["--dst", str(dst)]) == 0
    assert calls["model_info"] == ("nnInteractive/nnInteractive", None)
    assert calls["snapshot_download"] == ("nnInteractive/nnInteractive", Info.sha, ["nnInteractive_v1.0/*"])
    record = json.loads((dst / "provenance.json").read_text())
    assert record["source"] == {"huggingface_repo": "nnInteractive/nnInteractive",
                                "model": "nnInteractive_v1.0", "revision": Info.sha}


def test_hub_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    assert prepare_weights.main(["--dst", str(tmp_path / "w")]) == 1
    assert "needs huggingface_hub" in capsys.readouterr().err


def _card(arch, patch, channels=8):
    from infer.card import DEFAULT_CHANNELS, ModelCard
    from infer.network import normalize_arch
    return ModelCard(architecture=normalize_arch(arch), input_channels=channels, num_classes=2,
                     patch_size=tuple(patch), channels=DEFAULT_CHANNELS[:channels])


def test_v1_parameter_count_matches_the_reference_network():
    """The release check's v1.0 figure, rebuilt with nnU-Net's own architecture package."""
    unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    from tests.tinymodel import nninteractive_v1_arch
    kw = dict(nninteractive_v1_arch()["arch_kwargs"])
    kw.update(conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU)
    with torch.device("meta"):
        ref = unet.ResidualEncoderUNet(input_channels=8, num_classes=2, **kw)
    assert sum(p.numel() for p in ref.parameters()) == prepare_weights.V1_PARAMETERS


def test_release_checks_pass_the_v1_layout_and_say_what_is_unchecked(tmp_path):
    from tests.tinymodel import nninteractive_v1_arch
    make_release_folder(tmp_path / "rel")  # only the files' presence is read here
    arch = nninteractive_v1_arch()["arch_kwargs"]
    rows = prepare_weights.release_checks(tmp_path / "rel", _card(arch, (192, 192, 192)), None)
    status = {text.split(":")[0]: st for st, text in rows}
    assert all(status[k] == "ok" for k in ("layout", "architecture", "patch size", "channels",
                                          "parameters", "prompts"))
    unchecked = [text for st, text in rows if st == "not checked"]
    assert any("--expect-sha256" in t for t in unchecked)
    assert any("quality" in t for t in unchecked) and any("GPU" in t for t in unchecked)
    with_hash = prepare_weights.release_checks(tmp_path / "rel", _card(arch, (192,) * 3), "ab" * 32)
    assert not any("--expect-sha256" in t for st, t in with_hash if st == "not checked")


def test_release_checks_name_what_differs_from_v1(tmp_path):
    from tests.tinymodel import tiny_arch
    rel = make_release_folder(tmp_path / "rel")
    (rel / "inference_session_class.json").unlink()
    rows = dict((text.split(":")[0], (st, text)) for st, text in
                prepare_weights.release_checks(rel, _card(tiny_arch(), (16, 32, 32)), None))
    assert rows["layout"][0] == "differs" and "inference_session_class.json" in rows["layout"][1]
    assert rows["architecture"][0] == "differs" and "features_per_stage" in rows["architecture"][1]
    assert rows["patch size"] == ("differs", "patch size: 16x32x32 (v1.0: 192x192x192)")
    assert rows["parameters"][0] == "differs"


@pytest.mark.slow
def test_checks_are_printed_and_recorded(tmp_path, capsys):
    make_release_folder(tmp_path / "rel")
    dst = tmp_path / "out"
    assert prepare_weights.main(["--source", str(tmp_path / "rel"), "--dst", str(dst)]) == 0
    out = capsys.readouterr().out
    record = json.loads((dst / "provenance.json").read_text())
    assert {c["status"] for c in record["checks"]} == {"ok", "differs", "not checked"}
    for c in record["checks"]:
        assert c["check"] in out
