"""Odd but valid inputs the predictor must get right: classes without prompts, ``None`` boxes,
signed and float label maps, clicks far apart on a very long axis, a case without prompts."""
import logging

import numpy as np
import pytest
import torch

import infer.predictor
from infer.npz import read_case
from infer.predictor import Predictor
from infer.prompts import _unique_clicks
from infer.writer import to_labels
from tests.test_predictor import ChannelStub, box_dict, card, case_with

SHAPE = (40, 50, 60)


def _prev(dtype=np.uint8):
    prev = np.zeros(SHAPE, dtype)
    prev[5:12, 5:15, 5:15] = 1
    prev[25:35, 30:40, 40:50] = 3
    return prev


def test_classes_with_neither_prompt_nor_previous_mask_cost_nothing(monkeypatch):
    """4 000 empty clicks_order entries beside one boxed class: only the boxed class and the
    labels of the previous mask are visited; the output is what the one-class case gives."""
    calls = []
    real = Predictor._class
    monkeypatch.setattr(Predictor, "_class", lambda self, case, k, *a: calls.append(k) or real(self, case, k, *a))
    box = box_dict(10, 20, 10, 30, 10, 30)
    many = case_with(boxes=[box], clicks_order=[[]] * 4000, prev_pred=_prev())
    segs = Predictor(ChannelStub(channel=2), card(), "cpu", autozoom=False).predict(many)
    assert sorted(calls) == [1, 3]  # the boxed class, and class 3 of the previous mask
    calls.clear()
    one = case_with(boxes=[box], clicks_order=[[], [], []], prev_pred=_prev())
    expected = Predictor(ChannelStub(channel=2), card(), "cpu", autozoom=False).predict(one)
    assert segs.dtype == np.uint16 and expected.dtype == np.uint8  # K = 4000 and K = 3
    np.testing.assert_array_equal(segs, expected)
    assert (segs == 3).sum() == (_prev() == 3).sum()  # the unprompted class kept its mask


def test_asked_classes_tell_empty_entries_from_prompts_and_unusable_ones():
    from infer.entries import Malformed
    from infer.case import Case
    imgs = np.zeros((4, 4, 4), np.uint8)
    case = {"imgs": imgs, "boxes": [None, {}, box_dict(1, 2, 1, 2, 1, 2), None],
            "clicks": [{"fg": [], "bg": []}, None, None, {"fg": [[1, 2, 3]], "bg": []}],
            "clicks_order": [[], None, None, None, [None]]}
    assert [c.given for c in Case.from_mapping(case).classes] == [False, False, True, True, True]
    assert Case.from_mapping(case).asked() == [3, 4, 5]
    assert Case.from_mapping({"imgs": imgs, "boxes": [Malformed("bad")], "clicks": None}).asked() == [1]
    nothing = Case.from_mapping({"imgs": imgs, "boxes": [None], "clicks": [None], "clicks_order": None})
    assert nothing.num_classes == 1 and nothing.asked() == []


def test_a_none_box_keeps_the_classs_clicks(tmp_path):
    """``boxes[k] = None`` (no box for that class) with a valid click: the class is segmented
    from its click, as it is with an empty box ``{}``."""
    click = {"fg": [[20, 25, 30]], "bg": []}
    other = box_dict(2, 8, 2, 12, 2, 12)
    outs = {}
    for name, first in (("none", None), ("empty", {})):
        path = tmp_path / f"{name}.npz"
        np.savez(path, imgs=case_with()["imgs"], spacing=np.array([2.0, 1.0, 1.0]),
                 boxes=np.array([first, other], dtype=object),
                 clicks=np.array([click, {"fg": [], "bg": []}], dtype=object),
                 clicks_order=np.array([["fg"], []], dtype=object))
        case = read_case(path)
        pred = Predictor(ChannelStub(channel=4), card(), "cpu", autozoom=False)
        outs[name] = pred.predict(case)
        assert not [e for e in pred.events if e["event"] == "class_kept_previous"]
    assert (outs["none"] == 1).sum() > 0 and outs["none"][20, 25, 30] == 1
    np.testing.assert_array_equal(outs["none"], outs["empty"])


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.float32, np.float64, bool])
def test_previous_masks_follow_the_fallback_label_rule_for_every_dtype(dtype):
    """A previous mask of a signed, float or boolean dtype means what the fallback output makes of
    it (``infer.writer.to_labels``): negatives, NaN and labels above K are background, fractions
    round. With K = 200 and an int8 map, -56 must not become class 200 (int8 -56 == 200 after
    wrapping)."""
    prev = np.zeros(SHAPE, np.float64)
    prev[5:12, 5:15, 5:15] = 1
    prev[25:35, 30:40, 40:50] = -56
    if dtype is not bool:
        prev[15:20, 15:20, 15:20] = 2.4 if np.dtype(dtype).kind == "f" else 2
    prev = prev.astype(dtype)
    case = case_with(clicks_order=[[]] * 200, prev_pred=prev)  # K = 200, nothing prompted
    segs = Predictor(ChannelStub(channel=2), card(), "cpu", autozoom=False).predict(case)
    expected = to_labels(prev, 200)
    np.testing.assert_array_equal(segs, expected)
    assert not (segs == 200).any()


def test_clicks_far_apart_on_a_very_long_axis():
    """Two clicks 2^21 voxels apart along one axis are kept as two distinct clicks (a 20-bit
    packing of coordinates refused them)."""
    far = 1 << 21
    clicks = [(True, (0, 0, 3)), (False, (0, 1, far)), (True, (0, 0, 3))]
    pos, pts, weight = _unique_clicks(clicks, 0.5)
    rows = {(bool(p), tuple(int(v) for v in q)): float(w) for p, q, w in zip(pos, pts, weight)}
    # newest copy's weight: the repeated click is the newest (1.0), the far one 1 click older
    assert rows == {(True, (0, 0, 3)): 1.0, (False, (0, 1, far)): 0.5}


def test_a_case_without_any_prompt_says_so(caplog):
    case = case_with(prev_pred=_prev(), clicks_order=[[], [], []])
    with caplog.at_level(logging.WARNING, logger="infer"):
        segs = Predictor(ChannelStub(channel=2), card(), "cpu").predict(case)
    assert "no boxes and no clicks" in caplog.text
    np.testing.assert_array_equal(segs, _prev())  # every class kept its previous mask
