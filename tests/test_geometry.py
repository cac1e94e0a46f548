"""Geometry against hand-computed values and against torch's own interpolate on explicit crops."""
import torch
import torch.nn.functional as F

from infer.geometry import (Crop, bbox_of, crop_to_patch, make_crop, patch_to_region,
                            to_patch_coords, to_volume_coords, touches_border, zoom_for_extent)


def _explicit_crop(vol, crop, pad=0.0):
    """Reference: build the padded crop voxel by voxel (slicing), independent of the code under test."""
    out = torch.full(crop.size, pad, dtype=vol.dtype)
    lo, hi = crop.inside(vol.shape)
    if all(h > l for l, h in zip(lo, hi)):
        out[lo[0] - crop.lo[0]:hi[0] - crop.lo[0], lo[1] - crop.lo[1]:hi[1] - crop.lo[1],
            lo[2] - crop.lo[2]:hi[2] - crop.lo[2]] = vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return out


def test_make_crop_hand_values():
    c = make_crop((10, 20, 30), 1.0, (8, 8, 8))
    # nnInteractive's convention: [c - s//2, c + s//2 + s%2) = [10 - 4, 10 + 4): the centre voxel
    # is the upper of the two middle ones
    assert c.lo == (6, 16, 26) and c.size == (8, 8, 8) and c.hi == (14, 24, 34)
    c2 = make_crop((10, 10, 10), 2.0, (4, 6, 8))
    assert c2.size == (8, 12, 16) and c2.lo == (6, 4, 2)
    assert c2.scale == (2.0, 2.0, 2.0)
    # odd size: symmetric, [c - s//2, c + s//2 + 1)
    c3 = make_crop((10, 20, 30), 1.0, (7, 9, 5))
    assert c3.lo == (7, 16, 28) and c3.hi == (14, 25, 33)
    # zoom 1.5 on patch 5 -> round(7.5) = 8 (half to even), lo = 10 - 4
    assert make_crop((10, 10, 10), 1.5, (5, 5, 5)).size == (8, 8, 8)
    assert make_crop((10, 10, 10), 1.5, (5, 5, 5)).lo == (6, 6, 6)


def test_make_crop_rounds_float_centres_half_to_even():
    # nnInteractive's box centre is round((lo + hi) / 2): 12.5 -> 12, 13.5 -> 14, 12.6 -> 13
    assert make_crop((12.5, 13.5, 12.6), 1.0, (4, 4, 4)).lo == (10, 12, 11)
    assert make_crop((12.5, 13.5, 12.6), 1.0, (5, 5, 5)).lo == (10, 12, 11)


def test_zoom_for_extent():
    # (extent + 64/3) / 64 with the default margin of a third of the patch
    assert zoom_for_extent((10, 10, 10), (64, 64, 64)) == 1.0
    assert abs(zoom_for_extent((100, 20, 20), (64, 64, 64)) - (100 + 64 / 3) / 64) < 1e-9
    assert abs(zoom_for_extent((20, 20, 150), (64, 64, 96), margin=0.5) - 2.0625) < 1e-9
    assert zoom_for_extent((1000, 20, 20), (64, 64, 64), max_zoom=4.0) == 4.0


def test_identity_crop_is_exact_copy():
    vol = torch.rand(20, 30, 40)
    crop = Crop(lo=(3, 4, 5), size=(8, 8, 8), patch=(8, 8, 8))
    out = crop_to_patch(vol, crop)
    assert torch.equal(out, vol[3:11, 4:12, 5:13])


def test_crop_to_patch_matches_interpolate_with_padding():
    torch.manual_seed(0)
    vol = torch.rand(17, 23, 29, dtype=torch.float64)
    for crop in [Crop((-5, 3, 10), (24, 12, 30), (8, 8, 10)),   # zoom out, reaching outside
                 Crop((10, -7, -2), (13, 40, 9), (5, 16, 9)),   # anisotropic scale, borders
                 Crop((0, 0, 0), (17, 23, 29), (34, 46, 58))]:  # zoom in (upsampling)
        ref = F.interpolate(_explicit_crop(vol, crop, pad=-1.0)[None, None], size=crop.patch,
                            mode="trilinear", align_corners=False)[0, 0]
        got = crop_to_patch(vol, crop, pad=-1.0)
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, atol=1e-12)


def test_area_mode_matches_interpolate_area():
    torch.manual_seed(2)
    vol = torch.rand(17, 23, 29, dtype=torch.float64)
    for crop in [Crop((-5, 3, 10), (24, 12, 30), (8, 8, 10)), Crop((2, -9, -3), (15, 27, 20), (10, 9, 8))]:
        ref = F.interpolate(_explicit_crop(vol, crop, pad=0.5)[None, None], size=crop.patch, mode="area")[0, 0]
        got = crop_to_patch(vol, crop, pad=0.5, mode="area")
        assert torch.allclose(got, ref, atol=1e-12)


def test_crop_to_patch_small_source_with_origin():
    # A small tensor at an origin stands for a volume that is zero elsewhere.
    big = torch.zeros(30, 30, 30, dtype=torch.float64)
    small = torch.rand(3, 4, 5, dtype=torch.float64)
    big[10:13, 11:15, 12:17] = small
    crop = Crop((4, 6, 8), (18, 18, 18), (6, 9, 6))
    assert torch.allclose(crop_to_patch(small, crop, origin=(10, 11, 12)), crop_to_patch(big, crop), atol=1e-12)


def test_patch_to_region_matches_interpolate_then_slice():
    torch.manual_seed(1)
    patch = torch.rand(2, 8, 8, 10, dtype=torch.float64)
    shape = (17, 23, 29)
    crop = Crop((-5, 3, 10), (24, 12, 30), (8, 8, 10))
    full = F.interpolate(patch[None], size=crop.size, mode="trilinear", align_corners=False)[0]
    vals, lo, hi = patch_to_region(patch, crop, shape)
    # the in-volume part of the crop, by hand: z [0, 17), y [3, 15), x [10, 29)
    assert lo == (0, 3, 10) and hi == (17, 15, 29)
    ref = full[:, 5:22, 0:12, 0:19]
    assert torch.allclose(vals, ref, atol=1e-12)


def test_crop_then_paste_identity_at_unit_scale():
    vol = torch.rand(12, 13, 14)
    crop = Crop((2, -3, 5), (6, 6, 6), (6, 6, 6))
    patch = crop_to_patch(vol, crop)
    vals, lo, hi = patch_to_region(patch, crop, vol.shape)
    assert torch.equal(vals, vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])


def test_coordinates_hand_values_and_round_trip():
    crop = Crop((10, 0, -4), (32, 16, 16), (16, 16, 8))  # scale (2, 1, 2)
    pts = torch.tensor([[10.0, 0.0, -4.0], [25.5, 7.0, 3.5]], dtype=torch.float64)
    p = to_patch_coords(pts, crop)
    # z: (10 - 10 + 0.5) / 2 - 0.5 = -0.25 ; (25.5 - 10 + 0.5) / 2 - 0.5 = 7.5
    # y: unit scale -> unchanged ; x: (-4 + 4 + 0.5) / 2 - 0.5 = -0.25 ; (3.5 + 4 + 0.5)/2 - 0.5 = 3.5
    assert torch.allclose(p, torch.tensor([[-0.25, 0.0, -0.25], [7.5, 7.0, 3.5]], dtype=torch.float64))
    assert torch.allclose(to_volume_coords(p, crop), pts)


def test_patch_coords_agree_with_resampling_of_a_point():
    # A single bright voxel resampled into the patch peaks where to_patch_coords says it is.
    vol = torch.zeros(40, 40, 40, dtype=torch.float64)
    vol[21, 13, 30] = 1.0
    crop = Crop((8, 0, 16), (20, 40, 20), (20, 20, 10))  # scale (1, 2, 2)
    patch = crop_to_patch(vol, crop)
    p = to_patch_coords(torch.tensor([[21.0, 13.0, 30.0]]), crop)[0]
    arg = torch.nonzero(patch == patch.max())
    for a in range(3):
        assert (arg[:, a].double() - p[a]).abs().min() <= 0.5


def test_bbox_of_and_border():
    m = torch.zeros(10, 10, 10, dtype=torch.bool)
    assert bbox_of(m) is None
    m[2:5, 0:1, 7:10] = True
    assert bbox_of(m) == ((2, 0, 7), (5, 1, 10))
    crop = Crop((0, 5, 5), (10, 10, 10), (10, 10, 10))
    pm = torch.zeros(10, 10, 10, dtype=torch.bool)
    pm[0, 4, 4] = True  # touches z face 0, but crop.lo z = 0 is the volume border
    assert not touches_border(pm, crop, (40, 40, 40))
    pm[3, 9, 4] = True  # touches the far y face, inside the volume
    assert touches_border(pm, crop, (40, 40, 40))
    assert not touches_border(pm, crop, (40, 15, 40))  # now that face is the volume border


def test_crop_missing_the_source_is_all_pad():
    small = torch.ones(3, 3, 3)
    crop = Crop((10, 10, 10), (8, 8, 8), (4, 4, 4))
    assert torch.equal(crop_to_patch(small, crop, origin=(0, 0, 0), pad=0.25), torch.full((4, 4, 4), 0.25))
    # overlapping in two axes but not the third is still a miss
    crop2 = Crop((0, 0, 5), (4, 4, 4), (4, 4, 4))
    assert torch.equal(crop_to_patch(small, crop2), torch.zeros(4, 4, 4))
