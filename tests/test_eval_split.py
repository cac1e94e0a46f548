"""The evaluation's per-kind summary line (box cases, no-box cases), on hand-made results."""
import math

import numpy as np
import pytest

from evaluation.report import kind_means, split_summary_line
from evaluation.runner import CaseResult


def _case(name, has_boxes, dsc, times=None):
    return CaseResult(name=name, n_classes=1, has_boxes=has_boxes, dsc=list(dsc),
                      ran=[has_boxes] + [True] * 5, times=list(times or [1.0] * 6))


def test_box_and_no_box_cases_are_summarised_apart():
    a = _case("a.npz", True, [0.6, 0.7, 0.7, 0.8, 0.8, 0.9])       # rise +0.3
    b = _case("b.npz", True, [0.8, 0.8, 0.8, 0.8, 0.8, 0.7])       # rise -0.1
    c = _case("c.npz", False, [0.0, 0.4, 0.5, 0.6, 0.7, 0.9])      # starts at click 1: +0.5
    line = split_summary_line([a, c, b])
    assert line == ("box cases 2: box stage DSC 0.7000 -> DSC_Final 0.8000 (mean change +0.1000) | "
                    "no-box cases 1: click 1 DSC 0.4000 -> DSC_Final 0.9000 (mean change +0.5000)")


def test_a_kind_without_cases_is_left_out_and_over_budget_counts_zero():
    slow = _case("s.npz", False, [0.0, 0.5, 0.6, 0.6, 0.6, 0.8], times=[0, 20, 20, 20, 20, 20])
    assert slow.over_budget  # 100 s > 90 s x 1 class
    assert split_summary_line([slow]) == \
        "no-box cases 1: click 1 DSC 0.5000 -> DSC_Final 0.0000 (mean change -0.5000)"
    assert split_summary_line([slow], zero_over_budget=False) == \
        "no-box cases 1: click 1 DSC 0.5000 -> DSC_Final 0.8000 (mean change +0.3000)"


def test_kind_means_of_a_run_stopped_after_one_click_stage():
    # a validation run with one click stage: stages 3..6 did not run and score 0
    a = _case("a.npz", True, [0.5, 0.7, 0, 0, 0, 0])
    c = _case("c.npz", False, [0.0, 0.4, 0, 0, 0, 0])
    means = kind_means([a, c], zero_over_budget=False, final_stage=1)
    assert means[True] == {"n": 1, "start": 0.5, "final": 0.7, "change": pytest.approx(0.2)}
    assert means[False] == {"n": 1, "start": 0.4, "final": 0.4, "change": 0.0}
    # by default the last stage is the final one, as in the organizer's DSC_Final
    assert kind_means([a])[True]["final"] == 0.0
    assert kind_means([a])[False]["n"] == 0 and math.isnan(kind_means([a])[False]["final"])


def test_validation_summary_reads_the_last_stage_it_ran(tmp_path):
    # train.validate on a real (tiny) validation folder, one click stage: the per-kind finals are
    # stage 2's Dice, not the unrun stage 6's 0
    from train.validate import evaluate, val_pairs
    rng = np.random.default_rng(0)
    gts = np.zeros((12, 24, 24), np.uint8)
    gts[3:9, 6:18, 6:18] = 1
    imgs = (gts * 100 + rng.integers(0, 10, gts.shape)).astype(np.int16)
    (tmp_path / "images").mkdir()
    (tmp_path / "gts").mkdir()
    box = {"z_min": 3, "z_max": 8, "z_mid": 5, "z_mid_y_min": 6, "z_mid_y_max": 17, "z_mid_x_min": 6,
           "z_mid_x_max": 17}
    np.savez(tmp_path / "images" / "b.npz", imgs=imgs, spacing=np.ones(3), boxes=np.array([box], object))
    np.savez(tmp_path / "images" / "n.npz", imgs=imgs, spacing=np.ones(3))
    for name in ("b", "n"):
        np.savez(tmp_path / "gts" / f"{name}.npz", gts=gts)

    def fill_box(case):  # a predictor that marks the object exactly once it has any prompt
        return gts.copy()

    s = evaluate(fill_box, val_pairs(tmp_path), n_clicks=1)
    assert s["box_dsc"] == 1.0 and s["final_dsc_box"] == 1.0
    assert s["click1_dsc_nobox"] == 1.0 and s["final_dsc_nobox"] == 1.0
