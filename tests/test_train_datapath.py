"""The data side's shortcuts give what the long way gives: the first click from ``gt``'s bounding
box equals ``evaluation.clicks.next_click`` against an empty prediction; ``CaseRef.load`` equals
``load_case``; an example whose image is normalised on first use equals one given the image, and
a deferred example never normalises it."""
import numpy as np
import pytest
import torch

import infer.predictor
from evaluation.clicks import next_click
from infer.card import DEFAULT_CHANNELS, ModelCard
from infer.geometry import Crop, crop_to_patch
from infer.policy import parse_policy
from scripts.synthetic import generate_case
from train.configs import get_config
from train.data import index_folder, load_case
from train.simulate import ModelNeeded, SimModel, crop_target, first_click, local_click, simulate_example


def _masks():
    rng = np.random.default_rng(0)
    for i in range(4):
        case = generate_case(np.random.default_rng([11, i]), shape=(24, 40, 40))
        for k in range(1, int(case["gts"].max()) + 1):
            yield f"synthetic {i} class {k}", case["gts"] == k
    tie = np.zeros((20, 30, 30), bool)
    tie[12:16, 20:24, 3:7] = True   # two equal cubes: the tie goes to the one cc3d numbers first
    tie[2:6, 5:9, 20:24] = True
    yield "tie of two cubes", tie
    corner = np.zeros((10, 12, 14), bool)
    corner[7:, 9:, 10:] = True
    yield "object in a corner", corner
    one = np.zeros((5, 6, 7), bool)
    one[4, 0, 6] = True
    yield "one voxel", one
    for j in range(6):  # many small components, equal sizes likely
        yield f"noise {j}", rng.random((16, 20, 24)) > 0.93
    yield "whole volume", np.ones((4, 5, 6), bool)


@pytest.mark.parametrize("name,gt", list(_masks()), ids=lambda v: v if isinstance(v, str) else "")
def test_first_click_is_next_click_on_an_empty_prediction(name, gt):
    assert first_click(gt) == next_click(np.zeros_like(gt), gt)


def test_caseref_load_equals_load_case(tmp_path):
    case = generate_case(np.random.default_rng(3), shape=(16, 24, 24))
    np.savez_compressed(tmp_path / "a.npz", imgs=case["imgs"], gts=case["gts"], spacing=case["spacing"])
    ref, = index_folder(tmp_path)
    a, b = ref.load(), load_case(tmp_path / "a.npz")
    assert a.labels == b.labels == tuple(range(1, int(case["gts"].max()) + 1))
    assert a.name == b.name and a.spacing == b.spacing
    assert np.array_equal(a.imgs, b.imgs) and np.array_equal(a.gts, b.gts)


def _card():
    cfg = get_config("tiny")
    return ModelCard(architecture=cfg["architecture"], input_channels=len(DEFAULT_CHANNELS), num_classes=2,
                     patch_size=cfg["patch_size"], box_style="2d", click_radius=4, prompt_decay=0.9)


def test_lazy_normalisation_gives_the_same_example_and_none_when_deferred(monkeypatch):
    model = SimModel(_card(), parse_policy("project"))
    case = generate_case(np.random.default_rng(5), shape=(24, 48, 48))
    gt = case["gts"] == 1
    image = infer.predictor.normalize_image(case["imgs"], torch.device("cpu"))
    calls = []
    real = infer.predictor.normalize_image
    monkeypatch.setattr(infer.predictor, "normalize_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    finished = deferred = 0
    for seed in range(12):
        try:
            lazy = simulate_example(model, case["imgs"], gt, np.random.default_rng(seed))
        except ModelNeeded:
            deferred += 1
            assert not calls, "a deferred example normalised the image"
            continue
        assert calls == [1]
        calls.clear()
        given = simulate_example(model, case["imgs"], gt, np.random.default_rng(seed), image=image)
        finished += 1
        assert torch.equal(lazy.x, given.x) and torch.equal(lazy.target, given.target)
        assert lazy.first == given.first and lazy.crop == given.crop
    assert finished and deferred  # both paths ran


def _crops():
    rng = np.random.default_rng(2)
    shape = (20, 30, 26)
    for _ in range(40):
        zoom = float(rng.choice([1.0, 1.0, 1.5, 0.75, 2.0]))
        patch = tuple(int(v) for v in rng.choice([8, 12, 16], size=3))
        size = tuple(max(1, int(round(p * zoom))) for p in patch)
        lo = tuple(int(rng.integers(-s, n)) for s, n in zip(size, shape))  # inside, partly or wholly out
        yield Crop(lo=lo, size=size, patch=patch)


def test_crop_target_equals_resampled_truth():
    rng = np.random.default_rng(1)
    gt = torch.from_numpy(rng.random((20, 30, 26)) > 0.6)
    n_zoom1 = 0
    for crop in _crops():
        want = (crop_to_patch(gt, crop) > 0.5).float()
        got = crop_target(gt, crop)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), crop
        n_zoom1 += crop.size == crop.patch
    assert n_zoom1 >= 10  # the direct path ran


def _pairs():
    rng = np.random.default_rng(4)
    for name, gt in _masks():
        yield f"{name}: empty prediction", np.zeros_like(gt), gt
        yield f"{name}: exact prediction", gt.copy(), gt
        noisy = gt ^ (rng.random(gt.shape) > 0.97)  # false positives anywhere, misses inside
        yield f"{name}: noisy prediction", noisy, gt
        shifted = np.roll(gt, 2, axis=2)  # too far right: a false-positive and a missed slab
        yield f"{name}: shifted prediction", shifted, gt
    gt = np.zeros((12, 16, 16), bool)
    gt[2:5, 2:5, 2:5] = True
    far = np.zeros_like(gt)
    far[9:12, 12:16, 12:16] = True  # a larger false positive away from the object
    yield "distant false positive", far, gt


@pytest.mark.parametrize("name,pred,gt", list(_pairs()), ids=lambda v: v if isinstance(v, str) else "")
def test_local_click_is_next_click(name, pred, gt):
    assert local_click(pred, gt) == next_click(pred, gt)
