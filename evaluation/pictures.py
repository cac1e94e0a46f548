"""Per-case picture: every stage of one case, one row per class, on the slice that matters.

``OUT/cases/<case>.png`` (beside ``report.png``): a grid of axial (y, x) slices, one row per class
(first ``max_classes``) and one column per stage:

- box stage: the slice ``z_mid`` of the organizer's box rule, taken from the ground truth (the z
  of the class's middle voxel in C order, ``np.where(gts == c)[0][n // 2]``; the box jitter moves
  only y and x, so this is the box's ``z_mid``), with the class's 2D box drawn when the case's
  ``boxes`` are given (solid on ``z_mid``, dotted on another slice of ``z_min..z_max``); a case
  without boxes shows that slice with the note "skipped";
- click stage k: the slice through the class's newest click (the one placed before stage k and
  answered by its output); when the class got no click (already perfect, ``None``) the row keeps
  the previous column's slice.

Each panel shows the image slice in grey; the row's class's errors as filled overlays, false
positives (predicted, not in the truth) in ``FP_COLOUR`` and false negatives (truth missed) in
``FN_COLOUR``; the ground-truth outline of the row's class (``TRUTH_COLOUR``) and, thin and grey,
of the other classes in the slice; above all of them the class's clicks on that slice as small
hollow markers (foreground: circle, background: square; earlier clicks smaller and fainter), so
that they never hide a small structure. The title gives the class's Dice and its change from the
previous stage (red when the step is harmful, ``evaluation.harm``). Slices are drawn with the
(y, x) aspect of ``spacing``; the legend at the bottom names every mark.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from .clicks import class_labels
from .harm import HARM_THRESHOLD

__all__ = ["centre_slice", "stage_slices", "error_overlay", "box_rectangle", "render_case", "draw_case",
           "draw_case_from_files", "draw_picture", "LEGEND"]

STAGE_NAMES = ["box"] + [f"click {k}" for k in range(1, 6)]

# RGB in 0..1; chosen apart from each other and from the grey image
FP_COLOUR = (1.0, 0.25, 0.1)     # red-orange: predicted, not in the truth
FN_COLOUR = (0.1, 0.55, 1.0)     # blue: in the truth, missed
OVERLAY_ALPHA = 0.6
TRUTH_COLOUR = (1.0, 0.9, 0.0)   # yellow outline: the row's class's ground truth
OTHER_COLOUR = (0.75, 0.75, 0.75)  # other classes' ground truth
BOX_COLOUR = (1.0, 1.0, 1.0)     # the box prompt
FG_COLOUR = (0.0, 1.0, 0.0)      # foreground click (hollow circle)
BG_COLOUR = (1.0, 0.0, 1.0)      # background click (hollow square)
LEGEND = ["false positive", "false negative", "ground truth", "other classes' truth", "box",
          "fg click", "bg click"]


def centre_slice(mask: np.ndarray) -> int:
    """The organizer's ``z_mid`` of a non-empty (D, H, W) mask: z of its middle voxel in C order."""
    z = np.nonzero(mask)[0]
    return int(z[len(z) // 2])


def stage_slices(z_box: int, clicks: Sequence) -> List[int]:
    """z of each stage's panel for one class: ``z_box`` for the box stage, then the z of each click
    stage's click (``clicks``: Click or None per click stage), the previous z when None."""
    out = [int(z_box)]
    for click in clicks:
        out.append(int(click.zyx[0]) if click is not None else out[-1])
    return out


def error_overlay(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(H, W, 4) float RGBA of one slice's errors: ``FP_COLOUR`` where ``pred & ~truth``,
    ``FN_COLOUR`` where ``truth & ~pred`` (both at ``OVERLAY_ALPHA``), transparent elsewhere."""
    truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
    out = np.zeros(truth.shape + (4,), np.float32)
    out[pred & ~truth] = FP_COLOUR + (OVERLAY_ALPHA,)
    out[truth & ~pred] = FN_COLOUR + (OVERLAY_ALPHA,)
    return out


def box_rectangle(box: Optional[dict], z: int):
    """The outline of an organizer box dict (inclusive) on slice ``z``: ``(x0, y0, width, height,
    solid)`` in imshow's data coordinates (voxel edges: ``x_min - 0.5`` .. ``x_max + 0.5``),
    ``solid`` True on ``z_mid``; None when there is no box or ``z`` is outside ``z_min..z_max``."""
    if not box:
        return None
    zmid = int(box["z_mid"])
    if not int(box.get("z_min", zmid)) <= z <= int(box.get("z_max", zmid)):
        return None
    y0, y1 = sorted((int(box["z_mid_y_min"]), int(box["z_mid_y_max"])))
    x0, x1 = sorted((int(box["z_mid_x_min"]), int(box["z_mid_x_max"])))
    return x0 - 0.5, y0 - 0.5, x1 - x0 + 1, y1 - y0 + 1, z == zmid


def _outline(ax, mask2d: np.ndarray, colour, width: float, zorder: float = 3) -> None:
    if mask2d.any() and not mask2d.all():
        ax.contour(mask2d.astype(np.float32), levels=[0.5], colors=[colour], linewidths=width, zorder=zorder)


def _grey(imgs: np.ndarray):
    if imgs.dtype == np.uint8:
        return 0, 255
    lo, hi = np.percentile(imgs, [0.5, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def _legend_handles():
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    return [Patch(facecolor=FP_COLOUR, alpha=OVERLAY_ALPHA, label=LEGEND[0]),
            Patch(facecolor=FN_COLOUR, alpha=OVERLAY_ALPHA, label=LEGEND[1]),
            Line2D([], [], color=TRUTH_COLOUR, label=LEGEND[2]),
            Line2D([], [], color=OTHER_COLOUR, lw=0.8, label=LEGEND[3]),
            Patch(facecolor="none", edgecolor="0.2", label=LEGEND[4]),
            Line2D([], [], color=FG_COLOUR, marker="o", markerfacecolor="none", ls="none", label=LEGEND[5]),
            Line2D([], [], color=BG_COLOUR, marker="s", markerfacecolor="none", ls="none", label=LEGEND[6])]


def render_case(result, imgs: np.ndarray, gts: np.ndarray, spacing, segs_by_stage: Sequence[Optional[np.ndarray]],
                boxes: Optional[Sequence[dict]] = None, max_classes: int = 6):
    """The picture of one case as a matplotlib Figure (Agg); :func:`draw_case` saves it.

    Args:
        result: the case's ``CaseResult`` (``clicks``, ``class_dsc``, ``ran``, ``has_boxes``).
        imgs, gts: (D, H, W) image and ground-truth label map.
        spacing: (z, y, x) in mm.
        segs_by_stage: six (D, H, W) label maps, None for a stage that did not run.
        boxes: the case's organizer box dicts (class k at index k - 1), or None.
    Returns ``(fig, axes)``, axes (rows, stages).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    labels = class_labels(gts)
    rows = min(len(labels), max_classes)
    n_stages = len(segs_by_stage)
    vmin, vmax = _grey(imgs)
    aspect = float(spacing[1]) / float(spacing[2])
    h, w = imgs.shape[1:]
    size = 2.6
    fig, axes = plt.subplots(rows, n_stages, figsize=(size * n_stages, size * rows * h / w * aspect + 0.9),
                             squeeze=False, constrained_layout=True)
    for i in range(rows):
        c = int(labels[i])
        clicks = [stage[i] if i < len(stage) else None for stage in result.clicks]
        zs = stage_slices(centre_slice(gts == c), clicks)
        box = boxes[c - 1] if boxes is not None and c - 1 < len(boxes) else None
        for s in range(n_stages):
            ax = axes[i, s]
            z = zs[min(s, len(zs) - 1)]
            ax.imshow(imgs[z], cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
            truth = gts[z] == c
            if segs_by_stage[s] is not None:
                ax.imshow(error_overlay(truth, segs_by_stage[s][z] == c), aspect=aspect,
                          interpolation="nearest", zorder=2)
            for j in range(len(labels)):
                if j != i:
                    _outline(ax, gts[z] == labels[j], OTHER_COLOUR, 0.8)
            _outline(ax, truth, TRUTH_COLOUR, 1.2, zorder=4)
            rect = box_rectangle(box, z) if s == 0 else None
            if rect is not None:
                x0, y0, bw, bh, solid = rect
                ax.add_patch(Rectangle((x0, y0), bw, bh, fill=False, edgecolor=BOX_COLOUR, lw=1.2,
                                       ls="solid" if solid else "dotted", zorder=5))
            ax.set_xlim(-0.5, w - 0.5)
            ax.set_ylim(h - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            colour = "black"
            if segs_by_stage[s] is None:
                text = f"{STAGE_NAMES[s]} z={z}: skipped (no boxes)"
            else:
                d = result.class_dsc[s][i] if len(result.class_dsc[s]) > i else float("nan")
                text = f"{STAGE_NAMES[s]} z={z}: Dice {d:.3f}"
                if s > 0 and result.ran[s - 1] and len(result.class_dsc[s - 1]) > i:
                    delta = d - result.class_dsc[s - 1][i]
                    text += f" ({delta:+.3f})"
                    colour = "red" if -delta > HARM_THRESHOLD + 1e-9 else "black"
                if s > 0:
                    text += _mark_clicks(ax, clicks[:s], z)
            ax.set_title(text, fontsize=7, color=colour)
        axes[i, 0].set_ylabel(f"class {c}", fontsize=9)
    more = f" (first {rows} of {len(labels)} classes)" if rows < len(labels) else ""
    fig.suptitle(f"{Path(result.name).stem}: DSC per stage "
                 + " ".join(f"{v:.3f}" for v in result.dsc) + more, fontsize=9)
    fig.legend(handles=_legend_handles(), loc="lower center", ncol=len(LEGEND), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    fig.get_layout_engine().set(rect=(0, 0.05, 1, 0.95))
    return fig, axes


def draw_case(result, imgs: np.ndarray, gts: np.ndarray, spacing, segs_by_stage: Sequence[Optional[np.ndarray]],
              path, max_classes: int = 6, dpi: int = 80, boxes: Optional[Sequence[dict]] = None) -> Path:
    """Write the picture of one case (:func:`render_case`) to ``path`` (its folder is created)."""
    import matplotlib.pyplot as plt
    fig, _ = render_case(result, imgs, gts, spacing, segs_by_stage, boxes=boxes, max_classes=max_classes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _mark_clicks(ax, clicks: Sequence, z: int) -> str:
    """Draw this class's clicks lying on slice ``z`` (the newest larger, earlier ones smaller and
    fainter), above every outline and overlay; return the title suffix of the newest click."""
    newest = clicks[-1] if clicks else None
    for click in clicks[:-1]:
        if click is not None and click.zyx[0] == z:
            _marker(ax, click, 16, 0.6)
    if newest is None:
        return "\nno click (class perfect)"
    _marker(ax, newest, 36, 1.0)
    return f"\n{newest.kind} click at {tuple(int(v) for v in newest.zyx)}"


def _marker(ax, click, size, alpha) -> None:
    """A small hollow marker centred on the click's voxel: the voxel itself stays visible."""
    _, y, x = click.zyx
    fg = click.kind == "fg"
    ax.scatter([x], [y], s=size, marker="o" if fg else "s", facecolors="none",
               edgecolors=[FG_COLOUR if fg else BG_COLOUR], linewidths=1.2, alpha=alpha, zorder=6)


def draw_case_from_files(result, image_path, gts_path, segs: Sequence[np.ndarray], path, **kw) -> Path:
    """:func:`draw_case` reading ``imgs`` / ``spacing`` (plain arrays) and ``boxes`` (through
    ``infer.npz.read_case``'s restricted unpickler) from the image file and ``gts`` from
    ``gts_path`` (or the image file when None). ``segs``: the outputs of the stages that ran, in
    order (``evaluate_case(keep_segs=True)``)."""
    from infer.npz import read_case
    boxes = read_case(image_path, keys=("boxes",))["boxes"] if result.has_boxes else None
    if boxes is not None:
        boxes = [b if isinstance(b, dict) else None for b in boxes]  # an unusable entry: no box drawn
    kw.setdefault("boxes", boxes)
    with np.load(image_path, allow_pickle=False) as f:
        imgs, spacing = f["imgs"], f["spacing"]
        gts = f["gts"] if gts_path is None else None
    if gts is None:
        with np.load(gts_path, allow_pickle=False) as f:
            gts = f["gts"]
    it = iter(segs)
    by_stage = [next(it, None) if ran else None for ran in result.ran]
    return draw_case(result, imgs, gts, spacing, by_stage, path, **kw)


def draw_picture(result, image_path, gts_path, path, log=print) -> None:
    """:func:`draw_case_from_files` for ``python -m evaluation``: then drops ``result.segs`` (the
    stage outputs were kept only for the picture); a failure is logged, never fatal."""
    try:
        draw_case_from_files(result, image_path, gts_path, result.segs, path)
    except Exception as exc:  # noqa: BLE001 - a picture never stops an evaluation
        log(f"{Path(image_path).name}: no picture: {type(exc).__name__}: {exc}")
    finally:
        result.segs = []
