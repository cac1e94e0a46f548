"""End to end through crop, zoom, resample and paste with stub networks whose answer is known."""
import numpy as np
import pytest
import torch

from infer.card import ModelCard
from infer.predictor import Predictor, normalize_image
from tests.tinymodel import tiny_arch

PATCH = (32, 32, 32)


def card(box_style="3d", **kw):
    return ModelCard(architecture=tiny_arch(), input_channels=8, num_classes=2, patch_size=PATCH,
                     box_style=box_style, click_radius=4, prompt_decay=0.9, **kw)


class ChannelStub(torch.nn.Module):
    """Foreground logit = gain * (x[channel] - threshold); background logit 0. Counts its calls."""

    def __init__(self, channel, threshold=0.5, gain=50.0, fail_on=None):
        super().__init__()
        self.channel, self.threshold, self.gain, self.fail_on = channel, threshold, gain, fail_on
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        assert x.shape == (1, 8) + PATCH
        if self.fail_on is not None and self.fail_on(x):
            raise RuntimeError("stub failure")
        fg = self.gain * (x[:, self.channel] - self.threshold)
        return torch.stack([torch.zeros_like(fg), fg], 1)


def box_dict(z0, z1, y0, y1, x0, x1, zmid=None):
    zmid = (z0 + z1) // 2 if zmid is None else zmid
    return {"z_min": z0, "z_max": z1, "z_mid": zmid, "z_mid_y_min": y0, "z_mid_y_max": y1,
            "z_mid_x_min": x0, "z_mid_x_max": x1}


def case_with(shape=(40, 50, 60), **kw):
    rng = np.random.default_rng(0)
    c = {"imgs": rng.integers(0, 255, shape, dtype=np.uint8), "spacing": (2.0, 1.0, 1.0), "name": "t.npz",
         "boxes": None, "clicks": None, "clicks_order": None, "prev_pred": None}
    c.update(kw)
    return c


def test_box_stub_returns_the_box_region_3d_style():
    net = ChannelStub(channel=2)  # box+ channel
    pred = Predictor(net, card("3d"), "cpu", autozoom=False)
    # inclusive box z 5..12, y 10..20, x 30..45 (extent 8 x 11 x 16 -> zoom 1)
    segs = pred.predict(case_with(boxes=[box_dict(5, 12, 10, 20, 30, 45)]))
    expected = np.zeros((40, 50, 60), np.uint8)
    expected[5:13, 10:21, 30:46] = 1
    assert segs.dtype == np.uint8 and segs.shape == (40, 50, 60)
    assert np.array_equal(segs, expected)


def test_box_stub_2d_style_draws_only_z_mid():
    net = ChannelStub(channel=2)
    pred = Predictor(net, card("2d"), "cpu", autozoom=False)
    segs = pred.predict(case_with(boxes=[box_dict(5, 12, 10, 20, 30, 45, zmid=9)]))
    expected = np.zeros((40, 50, 60), np.uint8)
    expected[9, 10:21, 30:46] = 1
    assert np.array_equal(segs, expected)


def test_box_on_the_volume_border_and_zoomed_out():
    # A box wider than the patch forces zoom > 1; crop reaches outside the volume.
    net = ChannelStub(channel=2)
    pred = Predictor(net, card("3d"), "cpu", autozoom=False)
    segs = pred.predict(case_with(shape=(30, 64, 70), boxes=[box_dict(0, 29, 0, 40, 10, 69)]))
    expected = np.zeros((30, 64, 70), np.uint8)
    expected[0:30, 0:41, 10:70] = 1
    # area-downsampled box resampled back: only boundary voxels may differ
    diff = segs != expected
    inner = np.zeros_like(diff)
    inner[2:28, 2:39, 12:68] = True
    assert not diff[inner].any()
    assert diff.mean() < 0.05


def ball(shape, c, r=4):
    zz, yy, xx = np.indices(shape)
    return (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r


def test_point_stub_returns_a_ball_at_the_click_without_box():
    net = ChannelStub(channel=4, threshold=0.1)  # point+ channel; soft ball >= 1/sqrt(17) inside
    pred = Predictor(net, card(), "cpu", autozoom=False)
    clicks = [{"fg": [[20, 7, 33]], "bg": []}]
    segs = pred.predict(case_with(clicks=clicks, clicks_order=[["fg"]]))
    assert np.array_equal(segs.astype(bool), ball((40, 50, 60), (20, 7, 33)))


def test_background_click_goes_to_the_negative_channel():
    net = ChannelStub(channel=5, threshold=0.1)  # point- channel
    pred = Predictor(net, card(), "cpu", autozoom=False)
    clicks = [{"fg": [[10, 10, 10]], "bg": [[30, 40, 50]]}]
    segs = pred.predict(case_with(clicks=clicks, clicks_order=[["fg", "bg"]]))
    assert np.array_equal(segs.astype(bool), ball((40, 50, 60), (30, 40, 50)))


def test_failing_class_leaves_the_others_segmented():
    calls = {"n": 0}

    def fail_second(_x):
        calls["n"] += 1
        return calls["n"] == 2

    net = ChannelStub(channel=2, fail_on=fail_second)
    pred = Predictor(net, card("3d"), "cpu", autozoom=False)
    boxes = [box_dict(2, 8, 2, 8, 2, 8), box_dict(12, 18, 12, 18, 12, 18), box_dict(22, 28, 22, 28, 22, 28)]
    segs = pred.predict(case_with(boxes=boxes))
    assert (segs[2:9, 2:9, 2:9] == 1).all()
    assert (segs == 2).sum() == 0
    assert (segs[22:29, 22:29, 22:29] == 3).all()


def test_class_marked_done_keeps_previous_mask_without_forward():
    prev = np.zeros((40, 50, 60), np.uint8)
    prev[3:9, 3:9, 3:9] = 1
    prev[20:30, 20:30, 20:30] = 2
    net = ChannelStub(channel=4, threshold=0.1)
    pred = Predictor(net, card(), "cpu", autozoom=False)
    clicks = [{"fg": [], "bg": []}, {"fg": [[25, 25, 25]], "bg": []}]
    order = [[None], ["fg"]]
    segs = pred.predict(case_with(clicks=clicks, clicks_order=order, prev_pred=prev))
    assert net.calls == 1  # only class 2 ran
    assert np.array_equal(segs == 1, prev == 1)
    # class 2: the stub answers a ball at its click; inside the crop it replaces the old cube
    assert np.array_equal(segs == 2, ball(prev.shape, (25, 25, 25)))


def test_merge_by_probability_overlap_goes_to_the_more_certain_class():
    class TwoLevel(torch.nn.Module):
        def forward(self, x):
            box = x[:, 2]
            level = 1.0 if float(box.sum()) > 3000 else 3.0  # big box: weak; small box: confident
            fg = torch.where(box > 0.5, torch.full_like(box, level), torch.full_like(box, -10.0))
            return torch.stack([torch.zeros_like(fg), fg], 1)

    pred = Predictor(TwoLevel(), card("3d"), "cpu", autozoom=False)
    boxes = [box_dict(5, 20, 5, 20, 5, 20), box_dict(10, 14, 10, 14, 10, 14)]
    segs = pred.predict(case_with(boxes=boxes))
    assert (segs[10:15, 10:15, 10:15] == 2).all()
    assert (segs[5:10, 5:21, 5:21] == 1).all()


def test_autozoom_zooms_out_when_the_prediction_touches_the_crop_border():
    class Everything(torch.nn.Module):
        def forward(self, x):
            fg = torch.full_like(x[:, 0], 5.0)
            return torch.stack([torch.zeros_like(fg), fg], 1)

    shape = (200, 200, 200)
    c = case_with(shape=shape, clicks=[{"fg": [[100, 100, 100]], "bg": []}], clicks_order=[["fg"]])
    segs = Predictor(Everything(), card(), "cpu", autozoom=True, max_zoom=4.0).predict(c)
    # zoom 1 -> 1.5 -> 2.25 -> 3.375 -> 4 (max): crop of 128 voxels around the click, as
    # nnInteractive places it: [100 - 128 // 2, 100 + 128 // 2) = [36, 164)
    fg = np.argwhere(segs == 1)
    assert fg.min(0).tolist() == [36, 36, 36] and fg.max(0).tolist() == [163, 163, 163]
    segs1 = Predictor(Everything(), card(), "cpu", autozoom=False).predict(c)
    assert (segs1 == 1).sum() == 32 ** 3


def test_deadline_passed_keeps_previous_masks():
    prev = np.zeros((40, 50, 60), np.uint8)
    prev[1:5, 1:5, 1:5] = 1
    net = ChannelStub(channel=4, threshold=0.1)
    c = case_with(clicks=[{"fg": [[30, 30, 30]], "bg": []}], clicks_order=[["fg"]], prev_pred=prev)
    segs = Predictor(net, card(), "cpu").predict(c, deadline=0.0, clock=lambda: 1.0)
    assert net.calls == 0 and np.array_equal(segs, prev)


def test_normalize_image_uses_the_nonzero_bounding_box():
    img = np.zeros((10, 10, 10), np.uint8)
    img[2:4, 2:4, 2:4] = [[[10, 20], [30, 40]], [[50, 60], [70, 80]]]
    out = normalize_image(img, torch.device("cpu")).numpy()
    vals = np.arange(10, 90, 10, dtype=np.float64)
    ref = (vals - vals.mean()) / vals.std(ddof=1)
    assert np.allclose(np.sort(out[2:4, 2:4, 2:4].ravel()), ref, atol=1e-5)
    assert (out[0] == 0).all() and (out[:, 5:] == 0).all()
    const = normalize_image(np.full((4, 4, 4), 7, np.uint8), torch.device("cpu"))
    assert torch.equal(const, torch.zeros(4, 4, 4))


def test_normalize_image_returns_the_raw_images_nonzero_box():
    img = np.zeros((10, 10, 10), np.int16)
    img[2, 3, 4], img[6, 8, 5] = 5, -3  # the box (2..6, 3..8, 4..5) holds zeros, which z-score to non-zero
    out, box = normalize_image(img, torch.device("cpu"), with_box=True)
    assert box == ((2, 3, 4), (7, 9, 6))
    assert (out[2:7, 3:9, 4:6] != 0).all() and int((out != 0).sum()) == 5 * 6 * 2
    assert normalize_image(np.zeros((3, 3, 3), np.uint8), torch.device("cpu"), with_box=True)[1] is None


def test_refinement_restores_full_resolution_after_zooming_out():
    # extent (20, 40, 20) -> zoom (40 + 32/3) / 32 = 1.58: the coarse answer is blurred at the box
    # faces; two zoom-1 patches tile the object and give back the exact box.
    boxes = [box_dict(10, 29, 5, 44, 20, 39)]
    expected = np.zeros((40, 50, 60), np.uint8)
    expected[10:30, 5:45, 20:40] = 1
    net = ChannelStub(channel=2)
    segs = Predictor(net, card("3d"), "cpu", autozoom=False, refine=True).predict(case_with(boxes=boxes))
    assert np.array_equal(segs, expected)
    assert net.calls == 1 + 2
    coarse = Predictor(ChannelStub(channel=2), card("3d"), "cpu", autozoom=False, refine=False).predict(
        case_with(boxes=boxes))
    assert not np.array_equal(coarse, expected)


def test_refinement_skipped_when_the_object_needs_too_many_patches():
    boxes = [box_dict(0, 39, 0, 49, 0, 59)]
    net = ChannelStub(channel=2)
    Predictor(net, card("3d"), "cpu", autozoom=False, refine=True, max_refine_patches=2).predict(case_with(boxes=boxes))
    assert net.calls == 1


def test_class_numbers_above_255_do_not_wrap_against_a_uint8_prev_pred():
    # K = 300; prev_pred (uint8, as the harness stores it) holds class 44, which now gets a click
    # elsewhere and moves; class 300 (= 44 mod 256) is marked perfect and must not inherit 44's mask
    prev = np.zeros((40, 50, 60), np.uint8)
    prev[5:10, 5:10, 5:10] = 44
    k = 300
    clicks = [{"fg": [], "bg": []} for _ in range(k)]
    order = [[None] for _ in range(k)]
    clicks[43] = {"fg": [[30, 40, 50]], "bg": []}
    order[43] = ["fg"]
    segs = Predictor(ChannelStub(channel=4, threshold=0.1), card(), "cpu", autozoom=False, refine=False).predict(
        case_with(clicks=clicks, clicks_order=order, prev_pred=prev))
    assert segs.dtype == np.uint16
    assert not (segs == 300).any()
    assert (segs[5:10, 5:10, 5:10] == 0).all() and segs[30, 40, 50] == 44


def test_a_perfect_class_keeps_its_voxels_against_a_saturated_prediction():
    # class 1 predicts a ball with probability exactly 1.0 (huge logits) over class 2's kept mask
    prev = np.zeros((40, 50, 60), np.uint8)
    prev[18:23, 18:23, 18:23] = 2
    net = ChannelStub(channel=4, threshold=0.1, gain=1e4)
    clicks = [{"fg": [[20, 20, 20]], "bg": []}, {"fg": [], "bg": []}]
    segs = Predictor(net, card(), "cpu", autozoom=False).predict(
        case_with(clicks=clicks, clicks_order=[["fg"], [None]], prev_pred=prev))
    assert (segs[18:23, 18:23, 18:23] == 2).all()
    assert (segs == 1).sum() == ball(prev.shape, (20, 20, 20)).sum() - 125


def test_one_refinement_tile_when_the_object_fits_the_patch():
    # extent 30 along y: fits the 32-voxel patch -> exactly one tile (not 2 per axis)
    boxes = [box_dict(10, 29, 5, 34, 20, 39)]  # (20, 30, 20) -> zoom (30 + 32/3)/32 = 1.27
    net = ChannelStub(channel=2)
    Predictor(net, card("3d"), "cpu", autozoom=False, refine=True).predict(case_with(boxes=boxes))
    assert net.calls == 1 + 1


def test_autozoom_keeps_the_smaller_zoom_when_zooming_out_loses_the_object():
    class LosesAtZoom(torch.nn.Module):
        """Everything foreground at zoom 1 (touches the border), nothing once zoomed out."""
        calls = 0

        def forward(self, x):
            LosesAtZoom.calls += 1
            level = 5.0 if LosesAtZoom.calls == 1 else -5.0
            fg = torch.full_like(x[:, 0], level)
            return torch.stack([torch.zeros_like(fg), fg], 1)

    c = case_with(shape=(100, 100, 100), clicks=[{"fg": [[50, 50, 50]], "bg": []}], clicks_order=[["fg"]])
    segs = Predictor(LosesAtZoom(), card(), "cpu", autozoom=True, refine=False).predict(c)
    assert LosesAtZoom.calls == 2 and (segs == 1).sum() == 32 ** 3


def test_foreground_label_is_the_argmax_of_the_logits():
    """Logits one float step apart have a softmax of exactly 0.5; the label must still be the
    argmax (foreground iff logit1 > logit0), as nnInteractive takes it."""
    from infer.engine import fg_prob as _fg_prob
    a = torch.tensor(0.9700114130973816)
    b = torch.nextafter(a, torch.tensor(2.0))
    logits = torch.stack([torch.stack([a, b, a, torch.tensor(1.0)]), torch.stack([b, a, a, torch.tensor(0.0)])])
    assert float(torch.softmax(logits, 0)[1][0]) == 0.5  # the case the argmax rule is for
    assert ((_fg_prob(logits) > 0.5) == (logits.argmax(0) == 1)).all()
