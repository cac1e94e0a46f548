"""The interaction policy's decisions (infer/policy.py) against hand-computed numbers, scipy's
grey morphology, and stub networks whose answers are known."""
import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from infer.geometry import Crop, make_crop
from infer.policy import (PRESETS, Policy, border_change, box_view_reference, cover_tiles, diff_map,
                          bbox_tiles, fallback_tile, initial_view, next_zoom, open_mask, parse_policy,
                          refine_tiles, sample_tile, upsample, view_crop, wants_zoom_out,
                          zoom_step)
from infer.predictor import Predictor
from infer.prompts import ClassPrompts
from tests.test_predictor import ChannelStub, box_dict, card, case_with

REF, PROJ = PRESETS["reference"], PRESETS["project"]


# ---------------------------------------------------------------------------- presets and parsing
def test_presets_and_spec_parsing():
    assert parse_policy(None) is PROJ and parse_policy("project") is PROJ
    assert parse_policy("reference") is REF and parse_policy(REF) is REF
    p = parse_policy("reference,refine=none,lasso=off,max_zoom=2.5,mirror=on")
    assert (p.refine, p.lasso, p.max_zoom, p.mirror) == ("none", False, 2.5, True)
    assert p.zoom_out == REF.zoom_out and p.merge == "label"
    assert p.name == "reference,refine=none,lasso=off,max_zoom=2.5,mirror=on"
    assert parse_policy("merge=label").merge == "label"  # knobs alone: on the default preset
    for bad in ("nonsense", "reference,refine=everything", "reference,colour=red", "project,lasso=maybe"):
        with pytest.raises(ValueError):
            parse_policy(bad)
    # the reference's knobs are nnInteractive 1.1.5's loop
    assert (REF.crop_nonzero, REF.box_view, REF.click_zoom, REF.zoom_out, REF.zoom_value) == \
        (True, "box", "one", "border_change", "nominal")
    assert (REF.max_zoom, REF.zoom_step, REF.upsample, REF.refine, REF.lasso, REF.merge, REF.mirror) == \
        (4.0, 1.5, "label", "diff", True, "label", False)


def test_the_old_spelling_of_merge_is_still_read():
    # cards written before the class-merge knob was named ``merge`` carry ``paste=...``
    old, new = parse_policy("reference,paste=prob"), parse_policy("reference,merge=prob")
    assert old.merge == new.merge == "prob" and REF.merge == "label"
    assert dataclasses.replace(old, name="") == dataclasses.replace(new, name="")
    assert old.name == "reference,paste=prob"  # the name records the spec as written
    assert old.paste == "prob" and REF.replace(paste="prob").merge == "prob"
    with pytest.raises(ValueError):
        parse_policy("reference,paste=sum")
    with pytest.raises(TypeError):  # the old spelling is no constructor field
        Policy(paste="prob")


def test_card_carries_an_optional_policy():
    from infer.card import CardError
    c = card(policy="reference,refine=none")
    assert c.to_dict()["policy"] == "reference,refine=none" and "policy" not in card().to_dict()
    assert Predictor(ChannelStub(2), c, "cpu").policy.refine == "none"
    assert Predictor(ChannelStub(2), c, "cpu", policy="project").policy is PROJ  # explicit wins
    with pytest.raises(CardError):
        card(policy="reference,refine=all")


def test_command_line_and_environment_name_the_policy(monkeypatch):
    from infer.__main__ import parse_args
    monkeypatch.delenv("INFER_POLICY", raising=False)
    assert parse_args([]).policy is None
    assert parse_args(["--policy", "reference,refine=none"]).policy == "reference,refine=none"
    monkeypatch.setenv("INFER_POLICY", "reference")
    assert parse_args([]).policy == "reference" and parse_args(["--policy", "project"]).policy == "project"


def test_old_keyword_arguments_map_onto_the_policy():
    p = Predictor(ChannelStub(2), card(), "cpu", autozoom=False, refine=False, max_zoom=2.0,
                  max_refine_patches=3).policy
    assert (p.zoom_out, p.refine, p.max_zoom, p.max_refine_patches) == ("none", "none", 2.0, 3)
    assert Predictor(ChannelStub(2), card(), "cpu", policy="reference", autozoom=True).policy is REF


# ---------------------------------------------------------------------------- first view
def test_reference_box_view_fits_the_box_plus_a_third_of_a_patch():
    # patch 192: patch // 3 = 64. Size (20, 100, 1) -> max(84, 164, 65) / 192 < 1 -> zoom 1;
    # centres (10 + 30) / 2 = 20, (20 + 120) / 2 = 70, (30 + 31) / 2 = 30.5 -> 30 (half to even)
    c, z = box_view_reference(((10, 20, 30), (30, 120, 31)), (192, 192, 192))
    assert c == [20, 70, 30] and z == 1.0
    c, z = box_view_reference(((0, 0, 7), (200, 10, 10)), (192, 192, 192))
    assert z == (200 + 64) / 192 and c == [100, 5, 8]  # 8.5 -> 8
    # patch 32: 32 // 3 = 10, not 32 / 3 (the project's "extent" view uses 32 / 3)
    _, z = box_view_reference(((0, 0, 0), (20, 40, 20)), (32, 32, 32))
    assert z == (40 + 10) / 32
    ext = ClassPrompts(box=((0, 0, 0), (20, 40, 20)), extent=((0, 0, 0), (20, 40, 20)))
    assert initial_view(PROJ, ext, None, (32, 32, 32)) == ([9.5, 19.5, 9.5], pytest.approx((40 + 32 / 3) / 32))
    # capped at max_zoom
    assert box_view_reference(((0, 0, 0), (400, 1, 1)), (32, 32, 32))[1] == (400 + 10) / 32
    assert initial_view(REF, ClassPrompts(box=((0, 0, 0), (400, 1, 1)), extent=((0, 0, 0), (400, 1, 1))),
                        None, (32, 32, 32))[1] == 4.0


def test_click_view_one_or_fit():
    p = ClassPrompts(box=None, extent=None, clicks=[(True, (5, 5, 5)), (False, (20, 20, 20))])
    assert initial_view(REF, p, ((0, 0, 0), (41, 30, 30)), (32, 32, 32)) == ([20, 20, 20], 1.0)
    # "fit": half-width around the click covering the previous mask's box: z max(20, 40 - 20) = 20
    # -> extent 41; zoom (41 + 32/3) / 32
    c, z = initial_view(PROJ, p, ((0, 10, 10), (41, 30, 30)), (32, 32, 32))
    assert c == [20, 20, 20] and z == pytest.approx((41 + 32 / 3) / 32)
    assert initial_view(PROJ, p, ((10, 10, 10), (31, 25, 21)), (32, 32, 32))[1] == 1.0  # fits


# ---------------------------------------------------------------------------- zooming out
def test_zoom_steps():
    seq, z = [], 1.0
    while (z := next_zoom(REF, z)) is not None:
        seq.append(z)
    assert seq == [1.5, 2.25, 3.375, 4.0]
    assert next_zoom(REF, 4 / 3) == pytest.approx(2.0)
    # "scale" multiplies the crop's actual scale: zoom 1.0833 on patch 32 -> crop 35 -> 35/32
    crop = make_crop((20, 20, 20), 1.0833, (32, 32, 32))
    assert crop.size == (35, 35, 35)
    assert zoom_step(PROJ, (20, 20, 20), 1.0833, crop, (32, 32, 32))[0] == 35 / 32 * 1.5
    assert zoom_step(REF, (20, 20, 20), 1.0833, crop, (32, 32, 32))[0] == pytest.approx(1.0833 * 1.5)
    assert zoom_step(REF, (20, 20, 20), 4.0, make_crop((20, 20, 20), 4.0, (32,) * 3), (32,) * 3) is None
    assert view_crop(REF, (50, 50, 50), 1.0, (32,) * 3, 2) == make_crop((50, 50, 50), 2.25, (32,) * 3)


def _face_rows(rows):
    """A 48^3 patch whose z = 0 face holds ones on the given y rows (all x)."""
    t = torch.zeros((48, 48, 48))
    t[0, rows] = 1
    return t


def test_border_change_thresholds():
    empty = torch.zeros((48, 48, 48))
    one_face = torch.zeros((48, 48, 48))
    one_face[0].view(-1)[:101] = 1
    assert border_change(one_face, empty)            # 101 differ > 100, relative change huge
    one_face[0].view(-1)[100] = 0
    assert not border_change(one_face, empty)        # 100 differ: not more than 100
    # relative change: 48 rows (2304) against 40 rows (1920): 2304 / 1920 - 1 = 0.2, not > 0.2
    assert not border_change(_face_rows(slice(0, 48)), _face_rows(slice(0, 40)))
    assert border_change(_face_rows(slice(0, 48)), _face_rows(slice(0, 39)))  # 0.23 > 0.2
    # same count, shifted: relative change 0; 30 rows each, overlap 15 -> 1440 differ <= 1500
    assert not border_change(_face_rows(slice(15, 45)), _face_rows(slice(0, 30)))
    # 31 rows each, overlap 14 -> 34 rows = 1632 differ > 1500
    assert border_change(_face_rows(slice(17, 48)), _face_rows(slice(0, 31)))
    # the last face of another axis counts too
    t = torch.zeros((48, 48, 48))
    t[:, :, 47] = 1
    assert border_change(t, empty)


def test_touch_counts_only_faces_inside_the_volume():
    prob = torch.ones((8, 8, 8))
    crop = Crop(lo=(0, 0, 0), size=(8, 8, 8), patch=(8, 8, 8))
    assert not wants_zoom_out(PROJ, prob, crop, (8, 8, 8))
    assert wants_zoom_out(PROJ, prob, crop, (8, 8, 9))
    assert not wants_zoom_out(PROJ.replace(zoom_out="none"), prob, crop, (8, 8, 9))
    # border_change ignores the volume: a full prediction against an empty previous mask changes
    assert wants_zoom_out(REF, torch.ones((16, 16, 16)), Crop((0,) * 3, (16,) * 3, (16,) * 3), (16,) * 3)


# ---------------------------------------------------------------------------- coarse -> volume
def test_upsample_label_thresholds_the_trilinear_label():
    prob = torch.zeros((4, 4, 4))
    prob[1] = 0.9  # label 1 on the plane z = 1 of the patch
    crop = Crop(lo=(0, 0, 0), size=(8, 8, 8), patch=(4, 4, 4))
    # along z, align_corners=False: crop voxel i samples patch coordinate (i + 0.5) / 2 - 0.5:
    # i = 0..5 -> 0, 0.25, 0.75, 0.75, 0.25, 0 of the label
    vals, lo, hi = upsample(REF, prob, crop, (8, 8, 8))
    assert (lo, hi) == ((0, 0, 0), (8, 8, 8))
    assert vals[:, 3, 3].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    pv, _, _ = upsample(PROJ, prob, crop, (8, 8, 8))
    assert pv[:, 3, 3].tolist() == pytest.approx([0, 0.225, 0.675, 0.675, 0.225, 0, 0, 0])


# ---------------------------------------------------------------------------- refinement
def test_opening_is_scipy_grey_opening():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = rng.random((13, 17, 11)) > 0.35
        ref = ndimage.grey_dilation(ndimage.grey_erosion(m.astype(np.uint8), size=5, mode="nearest"),
                                    size=5, mode="nearest")
        assert np.array_equal(open_mask(torch.from_numpy(m)).numpy(), ref > 0)


def test_diff_map_opened_on_a_hand_made_volume():
    shape = (20, 20, 20)
    prev = torch.zeros(shape, dtype=torch.bool)
    prev[2:10, 2:10, 2:10] = True
    coarse = torch.zeros((12, 12, 12))  # over [0, 12)^3
    coarse[2:10, 2:10, 2:10] = 1
    coarse[2:10, 2:10, 10] = 1          # a one-voxel-thin change: opened away
    assert not diff_map(coarse, (0, 0, 0), (12, 12, 12), prev, shape).any()
    coarse[0:7, 0:7, 0:7] = 0           # a 7^3 corner removed (inside the old cube: 5^3 + ...)
    d = diff_map(coarse, (0, 0, 0), (12, 12, 12), prev, shape)
    raw = np.zeros(shape, np.uint8)
    raw[:12, :12, :12] = (coarse.numpy() > 0.5) != prev[:12, :12, :12].numpy()
    sub = raw[:12, :12, :12]
    expect = np.zeros(shape, bool)
    expect[:12, :12, :12] = ndimage.grey_dilation(ndimage.grey_erosion(sub, size=5, mode="nearest"),
                                                  size=5, mode="nearest") > 0
    assert np.array_equal(d.numpy(), expect)
    # the removed corner: voxels 2..6 of the old cube on each axis, a 5^3 block survives opening
    assert d[2:7, 2:7, 2:7].all() and int(d.sum()) == 125


def test_cover_tiles_hand_computed():
    # a 10^3 cube at [10, 20); patch 32, margin 10: a centre c covers [c - 6, c + 6). Stride
    # round(9 / 4) = 2: candidates 10, 12, .., 18 per axis; the first covering all 1000 voxels is
    # (14, 14, 14) (covers [8, 20)) -> one tile [-2, 30)
    m = torch.zeros((64, 64, 64), dtype=torch.bool)
    m[10:20, 10:20, 10:20] = True
    assert cover_tiles(m, (32, 32, 32)) == [((-2, -2, -2), (30, 30, 30))]
    # a rod z [0, 60) x y, x [20, 24): stride (15, 1, 1); candidates z 0, 15, 30, 45 each cover
    # 12, 12, 12 and 6 slices of 16 voxels: greedy picks 15, 30, 45, then 0
    m = torch.zeros((64, 64, 64), dtype=torch.bool)
    m[0:60, 20:24, 20:24] = True
    tiles = cover_tiles(m, (32, 32, 32))
    assert [t[0] for t in tiles[:4]] == [(-1, 4, 4), (14, 4, 4), (29, 4, 4), (-16, 4, 4)]
    # the rest (288 < 10^3 voxels) by the random fallback; every voxel ends up covered
    covered = torch.zeros_like(m)
    for lo, hi in tiles:
        assert tuple(h - l for l, h in zip(lo, hi)) == (32, 32, 32)
        covered[tuple(slice(max(l + 10, 0), h - 10) for l, h in zip(lo, hi))] = True
    assert bool(covered[m].all())
    assert cover_tiles(torch.zeros((8, 8, 8), dtype=torch.bool), (4, 4, 4)) == []


def test_refine_tiles_for_each_mode():
    shape = (40, 50, 60)
    coarse = torch.zeros((30, 50, 30))  # over [0, 30) x [0, 50) x [15, 45)
    coarse[10:30, 5:45, 5:25] = 1       # the object at z 10..29, y 5..44, x 20..39
    lo, hi = (0, 0, 15), (30, 50, 45)
    # project tiles over the object's box: z 20 <= 32 -> 10 + (20 - 32) // 2 = 4; y 40 > 32 ->
    # two tiles spread over [5, 13]; x -> 20 - 6 = 14
    assert bbox_tiles(((10, 5, 20), (30, 45, 40)), (32, 32, 32)) == [(4, 5, 14), (4, 13, 14)]
    assert refine_tiles(PROJ, (coarse, lo, hi), None, shape, (32,) * 3, (20, 25, 30)) == [(4, 5, 14), (4, 13, 14)]
    assert refine_tiles(PROJ.replace(max_refine_patches=1), (coarse, lo, hi), None, shape, (32,) * 3, (0, 0, 0)) == []
    assert refine_tiles(PROJ.replace(refine="none"), (coarse, lo, hi), None, shape, (32,) * 3, (0, 0, 0)) == []
    # diff: the coarse object against an empty previous mask; the tiles cover the opened difference
    tiles = refine_tiles(REF, (coarse, lo, hi), None, shape, (32,) * 3, (20, 25, 30))
    d = diff_map(coarse, lo, hi, None, shape)
    covered = torch.zeros(shape, dtype=torch.bool)
    for t in tiles:
        covered[tuple(slice(max(a + 10, 0), a + 22) for a in t)] = True
    assert tiles and bool(covered[d].all())
    # no difference (previous mask = coarse): the one tile around the interaction's centre
    prev = torch.zeros(shape, dtype=torch.bool)
    prev[10:30, 5:45, 20:40] = True
    assert refine_tiles(REF, (coarse, lo, hi), prev, shape, (32,) * 3, (20, 25, 30)) == [(4, 9, 14)]
    assert fallback_tile((20, 25, 30), (32, 32, 32)) == ((4, 9, 14), (36, 41, 46))


def test_training_tile_lies_where_the_predictor_tiles_go():
    rng = np.random.default_rng(0)
    box = ((10, 5, 20), (30, 45, 40))
    for _ in range(20):
        z, y, x = sample_tile(PROJ, box, (32, 32, 32), rng)
        assert z == 4 and x == 14 and 5 <= y <= 13


# ---------------------------------------------------------------------------- executed by the predictor
def test_paste_labels_or_probabilities():
    # two classes with the same (saturated) probability where their boxes overlap: by probability
    # the earlier class keeps ties; by labels the later class overwrites
    boxes = [box_dict(5, 14, 5, 14, 5, 14), box_dict(10, 19, 10, 19, 10, 19)]
    net = ChannelStub(channel=2, gain=1e4)
    prob = Predictor(net, card("3d"), "cpu", policy="project,zoom_out=none").predict(case_with(boxes=boxes))
    lab = Predictor(net, card("3d"), "cpu", policy="project,zoom_out=none,merge=label").predict(case_with(boxes=boxes))
    assert (prob[10:15, 10:15, 10:15] == 1).all() and (lab[10:15, 10:15, 10:15] == 2).all()
    for segs in (prob, lab):
        assert (segs[5:10, 5:15, 5:15] == 1).all() and (segs[15:20, 10:20, 10:20] == 2).all()
        assert int((segs > 0).sum()) == 2 * 1000 - 125


def test_reference_click_on_a_good_mask_keeps_it():
    # a large class already right; a click inside it. A network that answers with the previous
    # mask: the reference predicts once at zoom 1 around the click and pastes labels -> unchanged
    prev = np.zeros((40, 50, 60), np.uint8)
    prev[5:35, 5:45, 10:50] = 1
    c = case_with(boxes=[box_dict(5, 34, 5, 44, 10, 49)], clicks=[{"fg": [[20, 25, 30]], "bg": []}],
                  clicks_order=[["fg"]], prev_pred=prev)
    net = ChannelStub(channel=1)
    assert np.array_equal(Predictor(net, card("3d"), "cpu", policy="reference").predict(c), prev)
    assert net.calls == 1


def test_reference_crops_the_case_to_the_non_zero_box():
    c = case_with(boxes=[box_dict(5, 25, 10, 20, 10, 20)])
    c["imgs"][:10] = 0
    c["imgs"][10:] = np.maximum(c["imgs"][10:], 1)  # non-zero box: z 10..39
    segs = Predictor(ChannelStub(channel=2), card("3d"), "cpu", policy="reference").predict(c)
    expected = np.zeros_like(segs)
    expected[10:26, 10:21, 10:21] = 1  # the box drawn only inside the frame
    assert np.array_equal(segs, expected)
    segs = Predictor(ChannelStub(channel=2), card("3d"), "cpu", policy="reference,crop_nonzero=off").predict(c)
    expected[5:10, 10:21, 10:21] = 1
    assert np.array_equal(segs, expected)


def test_pseudo_lasso_keeps_refinement_inside_the_coarse_mask():
    # extent 40 along y on patch 32: zoomed out, refined by tiles; the stub answers with box+
    boxes = [box_dict(10, 29, 5, 44, 20, 39)]
    coarse = Predictor(ChannelStub(2), card("3d"), "cpu", policy="reference,refine=none").predict(case_with(boxes=boxes))
    on = Predictor(ChannelStub(2), card("3d"), "cpu", policy="reference").predict(case_with(boxes=boxes))
    off = Predictor(ChannelStub(2), card("3d"), "cpu", policy="reference,lasso=off").predict(case_with(boxes=boxes))
    expected = np.zeros_like(on)
    expected[10:30, 5:45, 20:40] = 1
    assert np.array_equal(off, expected)                  # tiles at zoom 1 give back the box
    assert (on <= coarse).all() and not np.array_equal(coarse, expected)


class Left(torch.nn.Module):
    """Foreground on the lower half of x only: flipping x moves it; the mean is 0.5 -> 0."""

    def forward(self, x):
        fg = torch.full_like(x[:, 0], -20.0)
        fg[..., : x.shape[-1] // 2] = 20.0
        return torch.stack([torch.zeros_like(fg), fg], 1)


def test_mirror_averages_the_flips():
    c = case_with(clicks=[{"fg": [[20, 25, 30]], "bg": []}], clicks_order=[["fg"]])
    assert (Predictor(Left(), card(), "cpu", policy="project,zoom_out=none").predict(c) == 1).any()
    assert not (Predictor(Left(), card(), "cpu", policy="project,zoom_out=none,mirror=on").predict(c) == 1).any()


def test_mirror_axes_choose_the_flips():
    from infer.policy import mirror_flips
    assert mirror_flips(parse_policy("reference")) == [()]
    every = mirror_flips(parse_policy("reference,mirror=on"))  # (B, C, Z, Y, X): z = dim 2
    # in this order (z fastest): the float sum over the flips, so the results, stay what they were
    assert every == [(), (2,), (3,), (2, 3), (4,), (2, 4), (3, 4), (2, 3, 4)]
    assert mirror_flips(parse_policy("reference,mirror=on,mirror_axes=yx")) == [(), (3,), (4,), (3, 4)]
    assert mirror_flips(parse_policy("mirror=on,mirror_axes=z")) == [(), (2,)]
    for bad in ("mirror_axes=xy", "mirror_axes=", "mirror_axes=zz", "mirror_axes=t"):
        with pytest.raises(ValueError):
            parse_policy("reference,mirror=on," + bad)


def test_only_the_named_axes_are_flipped():
    """A model whose foreground is the lower half of x: averaged away by any flip set that holds
    x, kept by one that does not."""
    c = case_with(clicks=[{"fg": [[20, 25, 30]], "bg": []}], clicks_order=[["fg"]])
    for axes, kept in (("zy", True), ("z", True), ("x", False), ("yx", False)):
        seg = Predictor(Left(), card(), "cpu", policy=f"project,zoom_out=none,mirror=on,mirror_axes={axes}").predict(c)
        assert bool((seg == 1).any()) is kept, axes


def test_previous_mask_reaches_the_patch_as_float64_nearest_interpolation():
    from infer.geometry import crop_to_patch_nearest
    rng = np.random.default_rng(0)
    src = torch.from_numpy(rng.random((30, 40, 50)) > 0.5)
    for lo, size, patch in [((6, 8, 1), (59, 42, 26), (28, 16, 22)), ((-5, 3, 10), (41, 59, 26), (28, 16, 22)),
                            ((0, 0, 0), (30, 40, 50), (30, 40, 50)),
                            ((10, -8, 40), (48, 48, 48), (32, 32, 32))]:
        crop = Crop(lo=lo, size=size, patch=patch)
        padded = torch.zeros(size, dtype=torch.float64)
        s_src = tuple(slice(max(l, 0), min(l + s, n)) for l, s, n in zip(lo, size, src.shape))
        s_dst = tuple(slice(max(l, 0) - l, min(l + s, n) - l) for l, s, n in zip(lo, size, src.shape))
        padded[s_dst] = src[s_src].double()
        expect = torch.nn.functional.interpolate(padded[None, None], patch, mode="nearest")[0, 0].float()
        assert torch.equal(crop_to_patch_nearest(src, crop), expect)
