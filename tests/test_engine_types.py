"""The small types of the interaction engine, against hand-made numbers: Budget (deadline on a
clock), Region (NaN keeps the previous mask) and the class values the merges receive."""
import math

import numpy as np
import torch

from infer.budget import Budget
from infer.predictor import CLASS_RUNGS
from infer.policy import PRESETS
from infer.region import KEEP, Region, class_values


def test_budget_fits_only_what_ends_by_the_deadline_and_costs_nothing_without_one():
    now = [10.0]
    budget = Budget(deadline=12.0, clock=lambda: now[0])
    assert budget.fits(lambda: 2.0) and not budget.fits(lambda: 2.5)
    asked = []
    assert Budget().fits(lambda: asked.append(1) or math.inf) and asked == []  # never estimated


def test_region_nan_keeps_what_lies_under_it():
    vals = torch.tensor([[[0.9, float("nan"), 0.2]]])
    region = Region(vals, (0, 1, 1), (1, 2, 4))
    base = torch.full((1, 3, 5), 7.0)
    out = region.over(base.clone(), (0, 0, 0))
    assert out[0, 1, 1] == 0.9 and out[0, 1, 2] == 7.0 and out[0, 1, 3] == 0.2
    assert int((out == 7.0).sum()) == 15 - 2
    prev = torch.zeros(1, 3, 5, dtype=torch.bool)
    prev[0, 1, 2] = True  # under the NaN: kept
    assert np.array_equal(np.argwhere(region.binary(prev, (1, 3, 5))), [[0, 1, 1], [0, 1, 2]])


def test_class_values_cover_the_region_and_the_previous_mask():
    prev = torch.zeros(4, 4, 4, dtype=torch.bool)
    prev[0, 0, 0] = True
    region = Region(torch.tensor([[[0.25]]]), (3, 3, 3), (4, 4, 4))
    prob, lo, hi = class_values(region, prev, ((0, 0, 0), (1, 1, 1)), torch.device("cpu"))
    assert (lo, hi) == ((0, 0, 0), (4, 4, 4))
    assert float(prob[0, 0, 0]) == np.float32(KEEP) and float(prob[3, 3, 3]) == 0.25
    assert class_values(None, None, None, torch.device("cpu")) is None


def test_the_out_of_memory_ladder_is_data():
    assert [r.name for r in CLASS_RUNGS] == ["planned", "zoom_1", "cpu_class"]
    pol = PRESETS["project"]
    assert CLASS_RUNGS[0].policy(pol) is pol
    capped = CLASS_RUNGS[1].policy(pol)
    assert capped.max_zoom == 1.0 and capped.zoom_out == "none" and not CLASS_RUNGS[1].cpu
    assert CLASS_RUNGS[2].cpu


def test_the_network_computes_the_same_in_train_and_eval_mode():
    """Why training may run the inference loop without switching the network to eval mode: its
    layers (convolutions, instance norm without running statistics, LeakyReLU) have no
    mode-dependent behaviour."""
    from tests.tinymodel import IN_CHANNELS, TINY_PATCH, tiny_network
    net = tiny_network(seed=3)
    x = torch.randn(1, IN_CHANNELS, *TINY_PATCH, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = net.train()(x)
        b = net.eval()(x)
    assert torch.equal(a, b)
