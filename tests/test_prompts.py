"""Prompt drawing (the 7 channels) against hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F

from infer.geometry import Crop, make_crop
from infer.prompts import ClassPrompts, _odd_kernel, encode, soft_ball


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


def _reference_point_channel(clicks, crop, shape, radius, decay, zoom):
    """nnInteractive's way, written out with plain torch ops and no code under test: a volume-sized
    channel, every click decays the channel then is drawn as max(channel, ball) clipped to the
    volume; the crop is cut out (zeros outside the volume), dilated over the whole crop by a
    k^3 max filter (window clipped to the crop: -inf padding) and area-resampled."""
    ball = soft_ball(radius)
    r = ball.shape[0] // 2
    vol = {True: torch.zeros(shape), False: torch.zeros(shape)}
    for positive, p in clicks:
        for v in vol.values():
            v.mul_(decay)
        big = torch.zeros(tuple(s + 2 * r for s in shape))
        sl = tuple(slice(c, c + 2 * r + 1) for c in p)
        big[sl] = ball
        inner = big[r:r + shape[0], r:r + shape[1], r:r + shape[2]]
        torch.maximum(vol[positive], inner, out=vol[positive])
    out = []
    for positive in (True, False):
        c = torch.zeros(crop.size)
        lo, hi = crop.inside(shape)
        c[tuple(slice(l - cl, h - cl) for l, h, cl in zip(lo, hi, crop.lo))] = vol[positive][
            tuple(slice(l, h) for l, h in zip(lo, hi))]
        k = int(math.floor((2 * zoom - 1 - 1) / 2 + 0.5)) * 2 + 1 if zoom > 1 else 1
        if k > 1:
            c = F.max_pool3d(c[None, None], k, stride=1, padding=k // 2)[0, 0]
        out.append(F.interpolate(c[None, None], crop.patch, mode="area")[0, 0])
    return torch.stack(out)


@pytest.mark.parametrize("zoom", [1.0, 1.5, 2.6, 4.0])
def test_encode_points_match_whole_channel_dilation_then_area(zoom):
    """Overlapping balls, a repeated click, clicks near and beyond the crop faces and the volume
    border, both polarities: equal to the whole-channel reference at every zoom."""
    shape = (70, 64, 60)
    patch = (10, 12, 14)
    crop = make_crop((30, 30, 30), zoom, patch)
    clicks = [(True, (30, 30, 30)), (True, (32, 31, 30)), (False, (30, 36, 33)), (True, (30, 30, 30)),
              (True, (crop.lo[0] - 3, 30, 30)), (False, (30, crop.hi[1] + 2, 31)), (True, (1, 2, 58)),
              (False, (69, 63, 0)), (True, (31, 29, 28)), (True, (30, 30, 30))]
    clicks = [(pos, p) for pos, p in clicks if all(0 <= v < s for v, s in zip(p, shape))]
    ch = encode(ClassPrompts(clicks=clicks), crop, None, radius=4, decay=0.8, shape=shape)
    ref = _reference_point_channel(clicks, crop, shape, 4, 0.8, zoom)
    assert torch.allclose(ch[3:5], ref, atol=1e-6)
    assert float(ref[0].sum()) > 0 and float(ref[1].sum()) > 0


def test_encode_point_mass_is_the_dilated_channel_s():
    """Hand-computed: one click, zoom 4 (kernel 7) on a 4x-subsampling crop: the dilated ball is
    the 9^3 ball grown by 3 voxels per side (15^3 support, 1 where the cube reaches the centre);
    with the click at the centre of a bin the patch voxel of that bin holds 1."""
    crop = Crop((0, 0, 0), (64, 64, 64), (16, 16, 16))
    ch = encode(ClassPrompts(clicks=[(True, (33, 33, 33))]), crop, None, radius=4, decay=1.0,
                shape=(64, 64, 64))
    # bin 8 covers volume 32..35; every voxel there is within 3 of the centre: all 1
    assert abs(float(ch[3, 8, 8, 8]) - 1.0) < 1e-6
    # total mass = sum of the dilated field / 64; the field is >= the undilated ball everywhere
    assert float(ch[3].sum()) * 64 > float(soft_ball(4).sum()) * 4


def test_encode_clicks_outside_reach_cost_nothing_and_repeats_draw_once():
    crop = Crop((100, 100, 100), (48, 48, 48), (16, 16, 16))  # zoom 3
    far = [(True, (10, 10, 10))] * 30_000 + [(False, (300, 300, 300))] * 30_000
    ch = encode(ClassPrompts(clicks=far), crop, None, radius=4, decay=0.9, shape=(400, 400, 400))
    assert float(ch.abs().sum()) == 0
    # 60 000 identical clicks equal one click (the newest copy's weight, 1)
    same = [(True, (120, 120, 120))] * 60_000
    one = encode(ClassPrompts(clicks=same[:1]), crop, None, radius=4, decay=0.9, shape=(400, 400, 400))
    many = encode(ClassPrompts(clicks=same), crop, None, radius=4, decay=0.9, shape=(400, 400, 400))
    assert torch.equal(one, many) and float(one[3].max()) > 0


def test_encode_repeated_click_keeps_the_newest_weight():
    crop = Crop((0, 0, 0), (20, 20, 20), (20, 20, 20))
    clicks = [(True, (5, 5, 5)), (False, (15, 15, 15)), (True, (5, 5, 5)), (False, (15, 15, 15)),
              (False, (10, 10, 10))]
    ch = encode(ClassPrompts(clicks=clicks), crop, None, radius=4, decay=0.5)
    # (5,5,5) last made 2 clicks before the newest, (15,15,15) 1 click before
    assert abs(float(ch[3, 5, 5, 5]) - 0.25) < 1e-6
    assert abs(float(ch[4, 15, 15, 15]) - 0.5) < 1e-6
    assert abs(float(ch[4, 10, 10, 10]) - 1.0) < 1e-6


def test_encode_slabs_equal_one_pass(monkeypatch):
    """The bounded-memory slab loop gives the same channel as rendering the region at once."""
    import infer.prompts as prompts_mod
    crop = make_crop((40, 40, 40), 2.6, (16, 16, 16))
    clicks = [(i % 3 != 0, (20 + 3 * i % 40, 25 + 5 * i % 30, 30 + 7 * i % 25)) for i in range(40)]
    whole = encode(ClassPrompts(clicks=clicks), crop, None, radius=4, decay=0.95, shape=(90, 90, 90))
    monkeypatch.setattr(prompts_mod, "_SLAB_VOXELS", 5000)
    monkeypatch.setattr(prompts_mod, "_CLICK_CHUNK", 7)
    sliced = encode(ClassPrompts(clicks=clicks), crop, None, radius=4, decay=0.95, shape=(90, 90, 90))
    assert torch.allclose(whole, sliced, atol=1e-6)


def test_odd_kernel_matches_round_to_nearest_odd():
    # nnInteractive's round_to_nearest_odd(2 * zoom - 1), worked by hand
    for zoom, k in ((1.0, 1), (1.25, 1), (1.5, 3), (2.0, 3), (2.25, 3), (2.5, 5), (2.6, 5), (3.0, 5),
                    (3.375, 5), (3.5, 7), (4.0, 7)):
        assert _odd_kernel(zoom) == k, zoom
