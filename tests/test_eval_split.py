"""The evaluation's per-kind summary line (box cases, no-box cases), on hand-made results."""
from evaluation.report import split_summary_line
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
