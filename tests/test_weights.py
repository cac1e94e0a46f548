"""infer.weights: release folders and artifacts load safely; malicious pickles never run."""
import builtins
import json
import os
import subprocess

import pytest
import torch

from infer.weights import WeightsError, load_model
from tinymodel import IN_CHANNELS, TINY_PATCH, make_artifact, make_release_folder, tiny_network

DESIGN_CHANNELS = ["image", "prev_mask", "box+", "box-", "point+", "point-", "scribble+", "scribble-"]


def _x(seed=0):
    return torch.randn(1, IN_CHANNELS, *TINY_PATCH, generator=torch.Generator().manual_seed(seed))


def test_release_folder_nested_one_level_loads_and_matches_source(tmp_path):
    make_release_folder(tmp_path / "download", nested="nnInteractive_v1.0", seed=5)
    net, card = load_model(tmp_path / "download")
    assert not net.training and all(not p.requires_grad for p in net.parameters())
    with torch.no_grad():
        want, got = tiny_network(seed=5)(_x()), net(_x())
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert card.patch_size == TINY_PATCH  # from the child configuration, not the parent's 64^3
    assert card.input_channels == 8 and card.num_classes == 2
    assert list(card.channels) == DESIGN_CHANNELS
    assert (card.box_style, card.click_radius, card.prompt_decay) == ("2d", 4, 0.9)
    assert card.demo is False and "3d_fullres_ps16" in card.source


def test_release_other_seed_gives_other_output(tmp_path):
    net, _ = load_model(make_release_folder(tmp_path, seed=6))
    with torch.no_grad():
        assert not torch.allclose(net(_x()), tiny_network(seed=5)(_x()))


@pytest.mark.parametrize("info, radius, decay", [
    ("str", 4, 0.9),
    ({"inference_class": "nnInteractiveInferenceSession", "point_radius": 3,
      "preferred_scribble_thickness": 2, "interaction_decay": 0.75}, 3, 0.75),
])
def test_session_info_sets_click_radius_and_decay(tmp_path, info, radius, decay):
    _, card = load_model(make_release_folder(tmp_path, session_info=info))
    assert (card.click_radius, card.prompt_decay) == (radius, decay)


def _poison(marker):
    """(label, callable, args, pickle protocol, name the error must contain); each payload would
    create ``marker`` if it ran."""
    return [
        ("os.system", os.system, (f"touch {marker}",), 2, f"{os.system.__module__}.system"),
        ("eval", builtins.eval, (f"open({str(marker)!r}, 'w')",), 4, "builtins.eval"),
        ("subprocess", subprocess.Popen, (["touch", str(marker)],), 4, "subprocess.Popen"),
    ]


class _Payload:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("which", [0, 1, 2])
def test_malicious_release_checkpoint_is_refused_and_never_runs(tmp_path, which):
    marker = tmp_path / "PWNED"
    _, fn, args, protocol, name = _poison(marker)[which]
    root = make_release_folder(tmp_path / "rel")
    ckpt_path = root / "fold_0" / "checkpoint_final.pth"
    # rebuild the checkpoint with the payload hidden in the training log
    good = tiny_network().state_dict()
    torch.save({"network_weights": good, "logging": {"x": [_Payload(fn, args)]},
                "init_args": {"configuration": "3d_fullres_ps16"}}, ckpt_path, pickle_protocol=protocol)
    with pytest.raises(WeightsError, match=name.replace(".", r"\.")) as err:
        load_model(root)
    assert "refused" in str(err.value)
    assert not marker.exists()


def test_malicious_artifact_weights_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    art = make_artifact(tmp_path / "art")
    sd = tiny_network().state_dict()
    sd["evil"] = _Payload(os.system, (f"touch {marker}",))
    torch.save(sd, art / "weights.pt")
    with pytest.raises(WeightsError, match="posix.system|nt.system"):
        load_model(art, verify=False)
    assert not marker.exists()


def test_artifact_admits_no_numpy_objects(tmp_path):
    import numpy as np
    art = make_artifact(tmp_path / "art")
    sd = dict(tiny_network().state_dict(), extra=np.float64(1.0))
    torch.save(sd, art / "weights.pt")
    with pytest.raises(WeightsError, match="refused"):
        load_model(art, verify=False)


def test_numpy1_style_legacy_checkpoint_loads(tmp_path):
    """A checkpoint written by numpy 1 names numpy.core.multiarray.scalar; the legacy (non-zip)
    torch format cannot be memory-mapped. Both must still load."""
    import numpy as np
    root = make_release_folder(tmp_path, seed=7)
    path = root / "fold_0" / "checkpoint_final.pth"
    torch.save({"network_weights": tiny_network(seed=7).state_dict(), "_best_ema": np.float64(0.5),
                "init_args": {"configuration": "3d_fullres_ps16", "device": torch.device("cpu")}},
               path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    assert raw.count(b"numpy._core.multiarray\nscalar") == 1
    path.write_bytes(raw.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))
    net, _ = load_model(root)
    with torch.no_grad():
        torch.testing.assert_close(net(_x()), tiny_network(seed=7)(_x()), atol=0, rtol=0)


def test_release_whose_plans_do_not_fit_the_weights_is_refused(tmp_path):
    root = make_release_folder(tmp_path)
    plans = json.loads((root / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 16, 32]
    (root / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(WeightsError, match="do not match|does not fit"):
        load_model(root)


def test_missing_configuration_is_named(tmp_path):
    root = make_release_folder(tmp_path, configuration="3d_fullres_ps16")
    plans = json.loads((root / "plans.json").read_text())
    del plans["configurations"]["3d_fullres_ps16"]
    (root / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(WeightsError, match="3d_fullres_ps16"):
        load_model(root)


def test_folder_without_model_or_with_two_models_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="neither"):
        load_model(tmp_path / "empty")
    make_artifact(tmp_path / "two" / "a")
    make_release_folder(tmp_path / "two" / "b")
    with pytest.raises(WeightsError, match="several models"):
        load_model(tmp_path / "two")
