"""The organizer's box rule (its ``get_boxes.py::mask3D_to_bbox``): one box dict per class from a
ground truth, as the harness stores them in ``boxes``. Arrays in (z, y, x) order."""
import numpy as np


def box_for_mask(mask, rng):
    """The organizer's box for one class (get_boxes.py::mask3D_to_bbox), as a dict of ints.

    Args:
        mask: (D, H, W) bool, non-empty.
        rng: np.random.Generator drawing the outward jitter s in 0..5.
    """
    z, y, x = np.nonzero(mask)
    z_mid = int(z[len(z) // 2])
    ys, xs = np.nonzero(mask[z_mid])
    H, W = mask.shape[1:]
    s = int(rng.integers(0, 6))
    sy, sx = int(s * H / 256), int(s * W / 256)
    return {"z_min": int(z.min()), "z_max": int(z.max()), "z_mid": z_mid,
            "z_mid_x_min": max(0, int(xs.min()) - sx), "z_mid_y_min": max(0, int(ys.min()) - sy),
            "z_mid_x_max": min(W - 1, int(xs.max()) + sx), "z_mid_y_max": min(H - 1, int(ys.max()) + sy)}


def boxes_for_gts(gts, rng):
    """One box dict per class 1..K (class k+1 at index k), K = gts.max()."""
    return [box_for_mask(gts == k, rng) for k in range(1, int(gts.max()) + 1)]
