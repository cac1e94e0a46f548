"""Click harm and final drop from the best click stage (evaluation.harm), on hand-made Dice sequences."""
import csv
import math

import numpy as np
import pytest

from evaluation.harm import (click_harm, final_drop_from_best, harm_rate, harm_summary_line,
                             pooled_click_harm, step_drops, steps_harm_by_position)
from evaluation.report import COLUMNS, write_csv
from evaluation.runner import CaseResult

ALL_RAN = [True] * 6
NO_BOX = [False] + [True] * 5


def test_drops_over_the_threshold_count_equal_or_smaller_do_not():
    # one class; steps: 0.6->0.8 (rise), 0.8->0.74 (drop 0.06: harm), 0.74->0.69 (drop 0.05: not
    # strictly more), 0.69->0.70 (rise), 0.70->0.30 (drop 0.40: harm)
    seq = [[0.6], [0.8], [0.74], [0.69], [0.70], [0.30]]
    assert click_harm(seq, ALL_RAN) == (2, 5)
    np.testing.assert_allclose(step_drops(seq, ALL_RAN)[:, 0], [-0.2, 0.06, 0.05, -0.01, 0.4], atol=1e-12)


def test_every_class_counts_at_every_step():
    # two classes: class 1 only rises; class 2 (perfect after stage 2, so it gets no click) loses
    # 0.1 at 3->4 because of class 1's click
    seq = [[0.5, 0.9], [0.6, 1.0], [0.7, 1.0], [0.8, 0.9], [0.9, 0.9], [0.95, 0.9]]
    assert click_harm(seq, ALL_RAN) == (1, 10)
    assert harm_rate(1, 10) == 0.1


def test_skipped_box_stage_leaves_its_step_out():
    # no boxes: stage 1 not run (stored as []), scored 0 in `dsc`; the 1->2 step is not counted
    seq = [[], [0.8, 0.7], [0.7, 0.9], [0.9, 0.9], [0.9, 0.9], [0.9, 0.8]]
    assert click_harm(seq, NO_BOX) == (2, 8)  # class 1 at 2->3, class 2 at 5->6
    # the same sequence with the box stage run and scored 0 would count 10 steps, none at 1->2
    ran_seq = [[0.0, 0.0]] + seq[1:]
    assert click_harm(ran_seq, ALL_RAN) == (2, 10)


def test_box_to_first_click_step_counts_when_the_box_stage_ran():
    seq = [[0.9], [0.5], [0.5], [0.5], [0.5], [0.5]]
    assert click_harm(seq, ALL_RAN) == (1, 5)
    harmful, counted = steps_harm_by_position([_result(seq, ALL_RAN)])
    assert harmful.tolist() == [1, 0, 0, 0, 0] and counted.tolist() == [1, 1, 1, 1, 1]


def test_nan_steps_are_not_counted_and_no_step_gives_nan_rate():
    seq = [[0.9, float("nan")], [0.5, float("nan")], [0.5, 1], [0.5, 1], [0.5, 1], [0.5, 1]]
    assert click_harm(seq, ALL_RAN) == (1, 8)
    assert math.isnan(harm_rate(0, 0))


def test_final_drop_from_best_click_stage():
    # mean DSC per stage; the box stage (0.99) is not a click stage
    assert final_drop_from_best([0.99, 0.5, 0.8, 0.7, 0.75, 0.6]) == pytest.approx(0.2)
    assert final_drop_from_best([0.0, 0.5, 0.6, 0.7, 0.8, 0.9]) == 0.0
    assert math.isnan(final_drop_from_best([0.5, 0.5, 0.6, 0.7, 0.8, float("nan")]))


def _result(class_dsc, ran, name="c.npz"):
    dsc = [float(np.mean(row)) if len(row) else 0.0 for row in class_dsc]
    return CaseResult(name=name, n_classes=len(class_dsc[-1]), has_boxes=ran[0], dsc=dsc,
                      ran=list(ran), class_dsc=[list(r) for r in class_dsc])


def test_pooled_rate_summary_and_csv_columns(tmp_path):
    a = _result([[0.6], [0.8], [0.74], [0.69], [0.70], [0.30]], ALL_RAN, "a.npz")  # 2 of 5
    b = _result([[], [0.8], [0.9], [0.9], [0.9], [0.9]], NO_BOX, "b.npz")  # 0 of 4
    assert pooled_click_harm([a, b]) == (2, 9)
    line = harm_summary_line([a, b])
    # a: best click stage 0.8, final 0.3 -> 0.5; b: 0
    assert "2/9" in line and "22.2%" in line and "0.5000 (a.npz)" in line
    write_csv([a, b], tmp_path / "m.csv")
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert list(rows[0]) == COLUMNS and COLUMNS[-1] == "Notes"
    assert float(rows[0]["ClickHarmRate"]) == 0.4 and rows[0]["HarmfulSteps"] == "2"
    assert rows[0]["ClickSteps"] == "5" and float(rows[0]["FinalDropFromBest"]) == pytest.approx(0.5)
    assert float(rows[1]["ClickHarmRate"]) == 0.0 and rows[1]["ClickSteps"] == "4"
