"""Prompt bookkeeping and drawing against hand-computed values."""
import math

import torch

from infer.geometry import Crop
from infer.prompts import (ClassPrompts, box_from_dict, chronological_clicks, class_prompts, encode,
                           num_classes, soft_ball)


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


def test_box_from_dict_inclusive_to_half_open_2d_and_3d():
    d = {"z_min": 3, "z_max": 9, "z_mid": 6, "z_mid_y_min": 10, "z_mid_y_max": 20,
         "z_mid_x_min": 30, "z_mid_x_max": 40}
    drawn, extent = box_from_dict(d, (20, 64, 64), "2d")
    assert drawn == ((6, 10, 30), (7, 21, 41))
    assert extent == ((3, 10, 30), (10, 21, 41))
    drawn3, _ = box_from_dict(d, (20, 64, 64), "3d")
    assert drawn3 == extent


def test_box_from_dict_clips_to_volume_and_swaps_inverted_bounds():
    d = {"z_min": -4, "z_max": 30, "z_mid": 25, "z_mid_y_min": 70, "z_mid_y_max": 50,
         "z_mid_x_min": -3, "z_mid_x_max": 5}
    drawn, extent = box_from_dict(d, (20, 64, 64), "2d")
    assert extent == ((0, 50, 0), (20, 64, 6))
    assert drawn == ((19, 50, 0), (20, 64, 6))  # z_mid clipped into the extent
    assert box_from_dict({"z_min": 30, "z_max": 40, "z_mid": 35, "z_mid_y_min": 1, "z_mid_y_max": 2,
                          "z_mid_x_min": 1, "z_mid_x_max": 2}, (20, 64, 64), "3d") == (None, None)


def test_soft_ball_values():
    b = soft_ball(4)
    assert b.shape == (9, 9, 9)
    # raw distances to the nearest outside voxel along an axis from the centre: sqrt(17), sqrt(10),
    # sqrt(5), sqrt(2), 1 -> divided by sqrt(17)
    expect = [math.sqrt(v) / math.sqrt(17) for v in (17, 10, 5, 2, 1)]
    assert torch.allclose(b[4, 4, 4:], torch.tensor(expect), atol=1e-6)
    assert int((b > 0).sum()) == 257  # voxels with d^2 <= 16
    assert b[0, 0, 0] == 0


def test_encode_decay_and_channels_at_unit_zoom():
    crop = Crop((0, 0, 0), (20, 20, 20), (20, 20, 20))
    p = ClassPrompts(box=((5, 5, 5), (6, 10, 12)), extent=None,
                     clicks=[(True, (10, 10, 10)), (False, (15, 15, 15)), (True, (3, 3, 3))])
    ch = encode(p, crop, None, radius=4, decay=0.5)
    assert ch.shape == (7, 20, 20, 20)
    assert torch.equal(ch[1, 5, 5:10, 5:12], torch.ones(5, 7)) and float(ch[1].sum()) == 35
    # three clicks: the oldest is decayed twice, the middle once, the newest not at all
    assert abs(float(ch[3, 10, 10, 10]) - 0.25) < 1e-6
    assert abs(float(ch[4, 15, 15, 15]) - 0.5) < 1e-6
    assert abs(float(ch[3, 3, 3, 3]) - 1.0) < 1e-6
    assert float(ch[0].abs().sum()) == 0 and float(ch[2].abs().sum()) == 0 and float(ch[5:].abs().sum()) == 0


def test_encode_zoomed_out_area_averages_the_box_and_dilates_points():
    crop = Crop((0, 0, 0), (40, 40, 40), (20, 20, 20))  # zoom 2
    p = ClassPrompts(box=((0, 0, 0), (4, 4, 4)), clicks=[(True, (21, 21, 21))])
    ch = encode(p, crop, None, radius=4, decay=0.9)
    # a 4^3 block area-averaged by 2 -> a 2^3 block of ones
    assert torch.allclose(ch[1, :2, :2, :2], torch.ones(2, 2, 2)) and float(ch[1].sum()) == 8
    # the ball was dilated by a 3^3 max filter first: patch voxel 10 (volume 20..21) holds 1
    assert abs(float(ch[3, 10, 10, 10]) - 1.0) < 1e-6


def test_class_prompts_and_num_classes():
    import numpy as np
    case = {"imgs": np.zeros((10, 10, 10), np.uint8), "boxes": None,
            "clicks": [{"fg": [[1, 2, 3]], "bg": []}, {"fg": [], "bg": []}],
            "clicks_order": [["fg"], [None]]}
    assert num_classes(case) == 2
    a, b = class_prompts(case, 1, "2d"), class_prompts(case, 2, "2d")
    assert a.clicks == [(True, (1, 2, 3))] and not a.done and a.box is None
    assert b.done and b.clicks == []


def test_num_classes_is_the_longest_list_and_bad_entries_fail_their_class_only():
    import numpy as np
    import pytest
    from infer.io import Malformed
    from infer.prompts import PromptError
    box = {"z_min": 1, "z_max": 3, "z_mid": 2, "z_mid_y_min": 1, "z_mid_y_max": 4, "z_mid_x_min": 1,
           "z_mid_x_max": 4}
    case = {"imgs": np.zeros((10, 10, 10), np.uint8), "boxes": [box, Malformed("boxes[1]: bad")],
            "clicks": [None, None, {"fg": [[1, 1, 1]], "bg": []}], "clicks_order": None}
    assert num_classes(case) == 3
    assert num_classes({"boxes": [], "clicks": [{}, {}], "clicks_order": [[], [], [], []]}) == 4
    assert num_classes({"boxes": None, "clicks": None}) == 0
    assert class_prompts(case, 1, "3d").box == ((1, 1, 1), (4, 5, 5))
    with pytest.raises(PromptError, match="boxes\\[1\\]: bad"):
        class_prompts(case, 2, "3d")
    assert class_prompts(case, 3, "3d").clicks == [(True, (1, 1, 1))]
    for bad, match in [(dict(box, z_min=1.5), "expected an integer"), (dict(box, z_min=None), "NoneType"),
                       (dict(box, other=1), "unknown key"), ({"z_mid": 2}, "missing key")]:
        with pytest.raises(PromptError, match=match):
            box_from_dict(bad, (10, 10, 10), "3d")
    assert box_from_dict(dict(box, z_min=1.0), (10, 10, 10), "3d")[0] == ((1, 1, 1), (4, 5, 5))
    with pytest.raises(PromptError, match="expected \\[z, y, x\\]"):
        chronological_clicks({"fg": [[1, 2]]}, None, (10, 10, 10))
    with pytest.raises(PromptError, match="clicks_order entry 'up'"):
        chronological_clicks({"fg": [[1, 2, 3]]}, ["up"], (10, 10, 10))
