"""The evaluation's per-kind summary line (box cases, no-box cases), on hand-made results."""
import math

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


def test_kind_means_on_short_runs_and_missing_kinds():
    # a validation run with one click stage: two stages per case
    a = _case("a.npz", True, [0.5, 0.7], times=[1.0, 1.0])
    c = _case("c.npz", False, [0.0, 0.4], times=[1.0, 1.0])
    means = kind_means([a, c], zero_over_budget=False)
    assert means[True] == {"n": 1, "start": 0.5, "final": 0.7, "change": pytest.approx(0.2)}
    assert means[False] == {"n": 1, "start": 0.4, "final": 0.4, "change": 0.0}
    # no stage after the skipped box stage: nothing to start from
    only_box_stage = kind_means([_case("d.npz", False, [0.0], times=[1.0])])
    assert math.isnan(only_box_stage[False]["start"]) and math.isnan(only_box_stage[False]["change"])
    assert kind_means([a])[False]["n"] == 0 and math.isnan(kind_means([a])[False]["final"])
