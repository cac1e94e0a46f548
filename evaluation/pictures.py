"""Per-case picture: every stage of one case, one row per class, on the slice that matters.

``OUT/cases/<case>.png`` (beside ``report.png``): a grid of axial (y, x) slices, one row per class
(first ``max_classes``) and one column per stage:

- box stage: the slice ``z_mid`` of the organizer's box rule, taken from the ground truth (the z
  of the class's middle voxel in C order, ``np.where(gts == c)[0][n // 2]``; the box jitter moves
  only y and x, so this is the box's ``z_mid`` without reading ``boxes``); a case without boxes
  shows that slice with the note "skipped";
- click stage k: the slice through the class's newest click (the one placed before stage k and
  answered by its output); when the class got no click (already perfect, ``None``) the row keeps
  the previous column's slice.

Each panel shows the image slice in grey, the ground-truth outline of every class present in the
slice (solid) and the stage's prediction outline (dashed), both in the class's colour, the newest
click of the row's class (foreground: filled circle, background: cross; earlier clicks of the class
on the same slice smaller and faded), and in its title the class's Dice and its change from the
previous stage (red when the step is harmful, ``evaluation.harm``). The row's own class is drawn
last and thicker. Slices are drawn with the (y, x) aspect of ``spacing``.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from .clicks import class_labels
from .harm import HARM_THRESHOLD

__all__ = ["centre_slice", "stage_slices", "draw_case", "draw_case_from_files", "draw_picture"]

STAGE_NAMES = ["box"] + [f"click {k}" for k in range(1, 6)]


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


def _colour(i: int):
    import matplotlib.pyplot as plt
    return plt.get_cmap("tab10")(i % 10)


def _outline(ax, mask2d: np.ndarray, colour, style: str, width: float) -> None:
    if mask2d.any() and not mask2d.all():
        ax.contour(mask2d.astype(np.float32), levels=[0.5], colors=[colour], linestyles=style,
                   linewidths=width)


def _grey(imgs: np.ndarray):
    if imgs.dtype == np.uint8:
        return 0, 255
    lo, hi = np.percentile(imgs, [0.5, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def draw_case(result, imgs: np.ndarray, gts: np.ndarray, spacing, segs_by_stage: Sequence[Optional[np.ndarray]],
              path, max_classes: int = 6, dpi: int = 80) -> Path:
    """Write the picture of one case.

    Args:
        result: the case's ``CaseResult`` (``clicks``, ``class_dsc``, ``ran``, ``has_boxes``).
        imgs, gts: (D, H, W) image and ground-truth label map.
        spacing: (z, y, x) in mm.
        segs_by_stage: six (D, H, W) label maps, None for a stage that did not run.
        path: the PNG to write (its folder is created).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

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
        c = labels[i]
        clicks = [stage[i] if i < len(stage) else None for stage in result.clicks]
        zs = stage_slices(centre_slice(gts == c), clicks)
        for s in range(n_stages):
            ax = axes[i, s]
            z = zs[min(s, len(zs) - 1)]
            ax.imshow(imgs[z], cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
            for j in [j for j in range(len(labels)) if j != i] + [i]:  # the row's class on top
                wide = 0.6 if j == i else 0.0
                _outline(ax, gts[z] == labels[j], _colour(j), "solid", 1.3 + wide)
                if segs_by_stage[s] is not None:
                    _outline(ax, segs_by_stage[s][z] == labels[j], _colour(j), "dashed", 1.1 + wide)
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
                    text += _mark_clicks(ax, clicks[:s], z, _colour(i))
            ax.set_title(text, fontsize=7, color=colour)
        axes[i, 0].set_ylabel(f"class {int(c)}", color=_colour(i), fontsize=9)
    handles = [Line2D([], [], color="0.3", ls="solid", label="ground truth"),
               Line2D([], [], color="0.3", ls="dashed", label="prediction"),
               Line2D([], [], color="0.3", marker="o", ls="none", markeredgecolor="white", label="fg click"),
               Line2D([], [], color="0.3", marker="X", ls="none", markeredgecolor="black", label="bg click")]
    more = f" (first {rows} of {len(labels)} classes)" if rows < len(labels) else ""
    fig.suptitle(f"{Path(result.name).stem}: DSC per stage "
                 + " ".join(f"{v:.3f}" for v in result.dsc) + more, fontsize=9)
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    fig.get_layout_engine().set(rect=(0, 0.04, 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _mark_clicks(ax, clicks: Sequence, z: int, colour) -> str:
    """Draw this class's clicks lying on slice ``z`` (the newest large, earlier ones small and
    faded); return the title suffix of the newest click."""
    newest = clicks[-1] if clicks else None
    for click in clicks[:-1]:
        if click is not None and click.zyx[0] == z:
            _marker(ax, click, colour, 50, 0.5)
    if newest is None:
        return "\nno click (class perfect)"
    _marker(ax, newest, colour, 140, 1.0)
    return f"\n{newest.kind} click at {tuple(int(v) for v in newest.zyx)}"


def _marker(ax, click, colour, size, alpha) -> None:
    _, y, x = click.zyx
    if click.kind == "fg":
        ax.scatter([x], [y], s=size, marker="o", c=[colour], edgecolors="white", linewidths=1.5,
                   alpha=alpha, zorder=5)
    else:
        ax.scatter([x], [y], s=size, marker="X", c=[colour], edgecolors="black", linewidths=1.0,
                   alpha=alpha, zorder=5)


def draw_case_from_files(result, image_path, gts_path, segs: Sequence[np.ndarray], path, **kw) -> Path:
    """:func:`draw_case` reading ``imgs`` / ``spacing`` (plain arrays only, never ``boxes``) from
    the image file and ``gts`` from ``gts_path`` (or the image file when None). ``segs``: the
    outputs of the stages that ran, in order (``evaluate_case(keep_segs=True)``)."""
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
