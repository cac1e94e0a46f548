"""The typed case: a case dict parsed once (boxes, click order, K, unusable entries) against hand-computed values."""
import numpy as np
import pytest

from evaluation.clicks import Click, ClickState
from infer.case import (Case, ClassEntry, PromptError, box_extent, chronological_clicks, drawn_box,
                        num_classes)
from infer.entries import Malformed
from infer.predictor import Predictor
from tests.test_predictor import ChannelStub, box_dict, card

SHAPE = (20, 30, 40)


def _imgs():
    return np.random.default_rng(0).integers(0, 255, SHAPE, dtype=np.uint8)


def test_a_box_becomes_its_half_open_extent_and_the_slice_it_is_drawn_on():
    # inclusive z 2..6, y 3..9, x 4..12 -> half-open (2, 3, 4)-(7, 10, 13); z_mid 4
    e = ClassEntry.parse(box_dict(2, 6, 3, 9, 4, 12, zmid=4), None, None, SHAPE)
    assert e.extent == ((2, 3, 4), (7, 10, 13)) and e.z_mid == 4 and e.given and e.failure is None
    assert drawn_box(e.extent, e.z_mid, "2d") == ((4, 3, 4), (5, 10, 13))
    assert e.prompts("3d").box == ((2, 3, 4), (7, 10, 13)) and e.prompts("3d").extent == e.extent
    # clipped to the volume (z 18..25 -> 18..20), z_mid 24 moved into the extent (19)
    e = ClassEntry.parse(box_dict(18, 25, 0, 29, 0, 39, zmid=24), None, None, SHAPE)
    assert e.extent == ((18, 0, 0), (20, 30, 40)) and e.z_mid == 19
    with pytest.raises(ValueError, match="box style"):
        e.prompts("4d")


def test_clicks_come_in_the_order_clicks_order_gives_with_stage_and_done():
    clicks = {"fg": [[1, 2, 3], [4, 5, 6]], "bg": [[7, 8, 9]]}
    e = ClassEntry.parse({}, clicks, ["fg", "bg", None, "fg"], SHAPE)
    assert e.clicks == ((True, (1, 2, 3)), (False, (7, 8, 9)), (True, (4, 5, 6)))
    assert e.stage == 4 and not e.done and e.extent is None
    done = ClassEntry.parse({}, clicks, ["fg", "bg", None, "fg", None], SHAPE)
    assert done.done and done.stage == 5
    # a click outside the volume is dropped; without clicks_order the stage counts the clicks kept
    e = ClassEntry.parse(None, {"fg": [[1, 2, 3], [20, 0, 0]], "bg": []}, None, SHAPE)
    assert e.clicks == ((True, (1, 2, 3)),) and e.stage == 1


def test_an_unusable_class_carries_its_error_and_the_others_parse():
    d = {"imgs": _imgs(), "boxes": [box_dict(2, 6, 3, 9, 4, 12), Malformed("boxes[1]: bad"),
                                    dict(box_dict(1, 2, 1, 2, 1, 2), z_mid_y_min=1.5)],
         "clicks": [None, None, None, {"fg": [[1, 2]], "bg": []}], "clicks_order": None}
    case = Case.from_mapping(d, name="c.npz")
    assert case.num_classes == 4 and case.asked() == [1, 2, 3, 4] and case.name == "c.npz"
    assert case.prompts(1, "2d").box == ((4, 3, 4), (5, 10, 13))
    for k, match in ((2, "boxes\\[1\\]: bad"), (3, "z_mid_y_min: expected an integer"),
                     (4, "fg click 0: expected \\[z, y, x\\]")):
        with pytest.raises(PromptError, match=match):
            case.prompts(k, "2d")


def test_training_parses_its_click_state_as_a_case_entry_would():
    from train.simulate import harness_prompts
    state = ClickState.empty(1)
    state.add(0, Click("fg", (np.int64(3), np.int64(4), np.int64(5))))
    state.add(0, Click("bg", (np.int64(6), np.int64(7), np.int64(8))))
    box = box_dict(2, 6, 3, 9, 4, 12)
    got = harness_prompts(SHAPE, box, state, "2d")
    want = Case.from_mapping({"imgs": _imgs(), "boxes": [box],
                              "clicks": [{"fg": [[3, 4, 5]], "bg": [[6, 7, 8]]}],
                              "clicks_order": [["fg", "bg"]]}).prompts(1, "2d")
    assert got == want and got.clicks == [(True, (3, 4, 5)), (False, (6, 7, 8))] and got.stage == 2


def test_the_predictor_gives_a_case_and_its_dict_the_same_labels():
    imgs = _imgs()
    d = {"imgs": imgs, "boxes": [box_dict(2, 8, 3, 12, 4, 16), {}, box_dict(10, 15, 15, 25, 20, 35)],
         "clicks": None, "clicks_order": None, "name": "t.npz"}
    pred = Predictor(ChannelStub(channel=2), card("3d"), "cpu")  # foreground = the box channel
    from_dict = pred.predict(d)
    from_case = pred.predict(Case.from_mapping(d))
    np.testing.assert_array_equal(from_dict, from_case)
    expected = np.zeros(SHAPE, np.uint8)
    expected[2:9, 3:13, 4:17] = 1
    expected[10:16, 15:26, 20:36] = 3
    np.testing.assert_array_equal(from_case, expected)


def test_a_callers_odd_dict_loses_one_class_or_is_refused_in_one_line():
    imgs = _imgs()
    pred = Predictor(ChannelStub(channel=2), card("3d"), "cpu")
    box = box_dict(2, 8, 3, 12, 4, 16)
    # warnings that are not a list are not the predictor's business
    ok = pred.predict({"imgs": imgs, "boxes": [box], "warnings": 5})
    assert ok[2:9, 3:13, 4:17].all() and ok.sum() == 7 * 10 * 13
    # a prompt list that cannot be indexed by class loses the classes it is read for, not the case
    seen = len(pred.events)
    kept = pred.predict({"imgs": imgs, "boxes": [box], "clicks": {"x": 1}})
    assert not kept.any()
    assert [(e["event"], e["why"], e["class"]) for e in pred.events[seen:]] == [("class_kept_previous", "KeyError", 1)]
    with pytest.raises(TypeError, match="a case is an infer.case.Case or a dict, not list"):
        pred.predict([imgs])


def test_chronological_clicks_walks_one_pointer_per_list_and_skips_none():
    clicks = {"fg": [[1, 1, 1], [2, 2, 2]], "bg": [[3, 3, 3]]}
    order = ["fg", None, "bg", "fg"]
    assert chronological_clicks(clicks, order, (10, 10, 10)) == [
        (True, (1, 1, 1)), (False, (3, 3, 3)), (True, (2, 2, 2))]


def test_chronological_clicks_disagreeing_lists_and_outside_points():
    clicks = {"fg": [[1, 1, 1], [2, 2, 2]], "bg": [[3, 3, 3], [50, 0, 0]]}
    # order mentions one bg more than exists and forgets one fg: the extra fg is appended
    order = ["bg", "bg", "bg", "fg"]
    seq = chronological_clicks(clicks, order, (10, 10, 10))
    assert seq == [(False, (3, 3, 3)), (True, (1, 1, 1)), (True, (2, 2, 2))]  # (50,0,0) dropped


def test_box_extent_inclusive_to_half_open_drawn_2d_and_3d():
    d = {"z_min": 3, "z_max": 9, "z_mid": 6, "z_mid_y_min": 10, "z_mid_y_max": 20,
         "z_mid_x_min": 30, "z_mid_x_max": 40}
    extent, z_mid = box_extent(d, (20, 64, 64))
    assert drawn_box(extent, z_mid, "2d") == ((6, 10, 30), (7, 21, 41))
    assert extent == ((3, 10, 30), (10, 21, 41))
    assert drawn_box(extent, z_mid, "3d") == extent


def test_box_extent_clips_to_volume_and_swaps_inverted_bounds():
    d = {"z_min": -4, "z_max": 30, "z_mid": 25, "z_mid_y_min": 70, "z_mid_y_max": 50,
         "z_mid_x_min": -3, "z_mid_x_max": 5}
    extent, z_mid = box_extent(d, (20, 64, 64))
    assert extent == ((0, 50, 0), (20, 64, 6))
    assert drawn_box(extent, z_mid, "2d") == ((19, 50, 0), (20, 64, 6))  # z_mid clipped into the extent
    assert box_extent({"z_min": 30, "z_max": 40, "z_mid": 35, "z_mid_y_min": 1, "z_mid_y_max": 2,
                       "z_mid_x_min": 1, "z_mid_x_max": 2}, (20, 64, 64))[0] is None


def test_a_case_s_prompts_by_class_and_num_classes():
    case = {"imgs": np.zeros((10, 10, 10), np.uint8), "boxes": None,
            "clicks": [{"fg": [[1, 2, 3]], "bg": []}, {"fg": [], "bg": []}],
            "clicks_order": [["fg"], [None]]}
    assert num_classes(case) == 2
    c = Case.from_mapping(case)
    a, b = c.prompts(1, "2d"), c.prompts(2, "2d")
    assert a.clicks == [(True, (1, 2, 3))] and not a.done and a.box is None
    assert b.done and b.clicks == []


def test_num_classes_is_the_longest_list_and_bad_entries_fail_their_class_only():
    box = {"z_min": 1, "z_max": 3, "z_mid": 2, "z_mid_y_min": 1, "z_mid_y_max": 4, "z_mid_x_min": 1,
           "z_mid_x_max": 4}
    case = {"imgs": np.zeros((10, 10, 10), np.uint8), "boxes": [box, Malformed("boxes[1]: bad")],
            "clicks": [None, None, {"fg": [[1, 1, 1]], "bg": []}], "clicks_order": None}
    assert num_classes(case) == 3
    assert num_classes({"boxes": [], "clicks": [{}, {}], "clicks_order": [[], [], [], []]}) == 4
    assert num_classes({"boxes": None, "clicks": None}) == 0
    c = Case.from_mapping(case)
    assert c.prompts(1, "3d").box == ((1, 1, 1), (4, 5, 5))
    with pytest.raises(PromptError, match="boxes\\[1\\]: bad"):
        c.prompts(2, "3d")
    assert c.prompts(3, "3d").clicks == [(True, (1, 1, 1))]
    for bad, match in [(dict(box, z_min=1.5), "expected an integer"), (dict(box, z_min=None), "NoneType"),
                       (dict(box, other=1), "unknown key"), ({"z_mid": 2}, "missing key")]:
        with pytest.raises(PromptError, match=match):
            box_extent(bad, (10, 10, 10))
    assert box_extent(dict(box, z_min=1.0), (10, 10, 10))[0] == ((1, 1, 1), (4, 5, 5))
    with pytest.raises(PromptError, match="expected \\[z, y, x\\]"):
        chronological_clicks({"fg": [[1, 2]]}, None, (10, 10, 10))
    with pytest.raises(PromptError, match="clicks_order entry 'up'"):
        chronological_clicks({"fg": [[1, 2, 3]]}, ["up"], (10, 10, 10))
