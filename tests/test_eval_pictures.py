"""Per-case pictures (evaluation.pictures)."""
import numpy as np
import pytest

from evaluation.clicks import Click
from evaluation.pictures import centre_slice, draw_case, stage_slices
from evaluation.runner import CaseResult
from scripts.synthetic import box_for_mask


def test_box_slice_is_the_organizers_z_mid():
    rng = np.random.default_rng(3)
    mask = np.zeros((30, 20, 20), bool)
    mask[4:9, 2:6, 2:6] = True
    mask[20:22, 10:12, 10:12] = True  # a second, smaller part: z_mid is the C-order middle voxel
    # 80 + 8 voxels; the 44th in C order is in slice 4 + 44 // 16 = 6
    assert centre_slice(mask) == 6 == box_for_mask(mask, rng)["z_mid"]


def test_each_click_stage_shows_the_slice_of_its_click_and_keeps_it_without_one():
    clicks = [Click("fg", (7, 1, 1)), None, Click("bg", (3, 2, 2)), None, None]
    assert stage_slices(12, clicks) == [12, 7, 7, 3, 3, 3]


def test_picture_is_written_for_a_case_without_box_stage(tmp_path):
    gts = np.zeros((10, 16, 16), np.uint8)
    gts[2:6, 3:9, 3:9] = 1
    gts[5:8, 9:14, 9:14] = 2
    imgs = (gts * 80).astype(np.uint8)
    segs = [None] + [gts.copy() for _ in range(5)]
    r = CaseResult(name="x.npz", n_classes=2, has_boxes=False, ran=[False] + [True] * 5,
                   dsc=[0.0] + [1.0] * 5, class_dsc=[[]] + [[1.0, 1.0]] * 5,
                   clicks=[[Click("fg", (3, 5, 5)), Click("fg", (6, 11, 11))]] + [[None, None]] * 4)
    path = draw_case(r, imgs, gts, (2.0, 1.0, 1.0), segs, tmp_path / "cases" / "x.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_pictures_and_harm_columns_and_line(tmp_path, capsys):
    """Cold mode with a predict.sh that alternates a perfect output and one without class 1:
    class 1 drops 1 -> 0 at steps 1->2, 3->4, 5->6, class 2 never: 3 harmful steps of 10."""
    import csv
    from evaluation.__main__ import main
    gts = np.zeros((12, 16, 16), np.uint8)
    gts[2:6, 3:9, 3:9] = 1
    gts[6:10, 9:14, 9:14] = 2
    box = {"z_min": 2, "z_max": 5, "z_mid": 4, "z_mid_y_min": 3, "z_mid_y_max": 8,
           "z_mid_x_min": 3, "z_mid_x_max": 8}
    for d in ("images", "gts"):
        (tmp_path / d).mkdir()
    np.savez(tmp_path / "images" / "c.npz", imgs=(gts * 60).astype(np.uint8),
             spacing=np.array([2.0, 1.0, 1.0]), boxes=[box, {**box, "z_min": 6, "z_max": 9, "z_mid": 8}])
    np.savez(tmp_path / "gts" / "c.npz", gts=gts)
    np.savez(tmp_path / "out0.npz", segs=gts)
    np.savez(tmp_path / "out1.npz", segs=np.where(gts == 1, 0, gts).astype(np.uint8))
    (tmp_path / "predict.sh").write_text(
        f'd="{tmp_path}"; n=$(cat "$d/count" 2>/dev/null || echo 0); echo $((n + 1)) > "$d/count"\n'
        'for f in "$INFER_INPUTS"/*.npz; do cp "$d/out$((n % 2)).npz" "$INFER_OUTPUTS/$(basename "$f")"; done\n')
    out = tmp_path / "out"
    assert main(["--images", str(tmp_path / "images"), "--gts", str(tmp_path / "gts"), "--out",
                 str(out), "--predict-sh", str(tmp_path / "predict.sh")]) == 0
    (row,) = csv.DictReader(open(out / "metrics.csv"))
    assert [float(row[f"DSC_{k}"]) for k in range(1, 7)] == [1.0, 0.5, 1.0, 0.5, 1.0, 0.5]
    assert (row["HarmfulSteps"], row["ClickSteps"]) == ("3", "10") and float(row["ClickHarmRate"]) == 0.3
    assert float(row["FinalDropFromBest"]) == 0.5
    assert "click harm: 3/10 class steps" in capsys.readouterr().out
    assert (out / "cases" / "c.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- what the pictures draw

def test_error_overlay_colours_false_positives_and_negatives_apart():
    from evaluation.pictures import FN_COLOUR, FP_COLOUR, error_overlay
    truth = np.array([[1, 1, 0], [0, 0, 0]], bool)
    pred = np.array([[1, 0, 1], [0, 0, 0]], bool)
    out = error_overlay(truth, pred)
    assert out.shape == (2, 3, 4)
    assert tuple(out[0, 2, :3]) == pytest.approx(FP_COLOUR) and out[0, 2, 3] > 0.3  # predicted, not true
    assert tuple(out[0, 1, :3]) == pytest.approx(FN_COLOUR) and out[0, 1, 3] > 0.3  # true, missed
    assert np.all(out[0, 0] == 0) and np.all(out[1] == 0)  # right, or nothing: transparent
    assert FP_COLOUR != FN_COLOUR


def test_box_rectangle_surrounds_the_inclusive_voxels():
    from evaluation.pictures import box_rectangle
    box = {"z_min": 2, "z_max": 6, "z_mid": 4, "z_mid_y_min": 3, "z_mid_y_max": 8,
           "z_mid_x_min": 10, "z_mid_x_max": 12}
    assert box_rectangle(box, 4) == (9.5, 2.5, 3, 6, True)  # x 10..12 = 3 voxels, y 3..8 = 6
    assert box_rectangle(box, 2) == (9.5, 2.5, 3, 6, False)  # another slice of the box: dotted
    assert box_rectangle(box, 7) is None and box_rectangle(None, 4) is None and box_rectangle({}, 4) is None


def _render(boxes, segs_offset=0):
    """A 1-class case on a black image: truth y, x 10..13 on slices 3..5; the prediction shifted by
    ``segs_offset`` voxels in x; a fg click at (4, 11, 11)."""
    from evaluation.pictures import render_case
    gts = np.zeros((8, 24, 24), np.uint8)
    gts[3:6, 10:14, 10:14] = 1
    pred = np.roll(gts, segs_offset, axis=2)
    imgs = np.zeros_like(gts)
    r = CaseResult(name="p.npz", n_classes=1, has_boxes=boxes is not None, ran=[True] * 6,
                   dsc=[1.0] * 6, class_dsc=[[1.0]] * 6,
                   clicks=[[Click("fg", (4, 11, 11))]] + [[None]] * 4)
    fig, axes = render_case(r, imgs, gts, (1.0, 1.0, 1.0), [pred] * 6, boxes=boxes)
    fig.canvas.draw()
    return fig, axes, np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)


def _pixels(fig, rgb, ax, x, y, r=1):
    """The (2r+1)^2 RGB pixels around data point (x, y) of ``ax`` in the rendered buffer."""
    px, py = ax.transData.transform((x, y))
    row, col = int(round(rgb.shape[0] - py)), int(round(px))
    return rgb[row - r:row + r + 1, col - r:col + r + 1].reshape(-1, 3)


def test_box_stage_panel_draws_the_box_at_its_voxel_edges():
    import matplotlib.pyplot as plt
    box = {"z_min": 3, "z_max": 5, "z_mid": 4, "z_mid_y_min": 6, "z_mid_y_max": 17,
           "z_mid_x_min": 5, "z_mid_x_max": 18}
    fig, axes, rgb = _render([box])
    white = lambda p: bool(np.any(np.all(p >= 150, axis=1)))  # noqa: E731  (antialiased white line)
    box_ax, click_ax = axes[0, 0], axes[0, 1]
    for x, y in ((4.5, 12), (18.5, 12), (11, 5.5), (11, 17.5)):  # the middle of each edge
        assert white(_pixels(fig, rgb, box_ax, x, y)), (x, y)
        assert not white(_pixels(fig, rgb, click_ax, x, y)), (x, y)  # no box on click stages
    assert np.all(_pixels(fig, rgb, box_ax, 7, 12) < 40)  # inside the box: the black image
    plt.close(fig)
    fig, axes, rgb = _render(None)  # no boxes: nothing drawn there
    assert not white(_pixels(fig, rgb, axes[0, 0], 4.5, 12))
    plt.close(fig)


def test_errors_are_filled_and_the_click_is_a_small_hollow_marker_on_top():
    import matplotlib.pyplot as plt
    fig, axes, rgb = _render(None, segs_offset=2)  # prediction x 12..15: FP x 14, 15; FN x 10, 11
    ax = axes[0, 0]
    fp, fn = _pixels(fig, rgb, ax, 15, 12, r=0)[0], _pixels(fig, rgb, ax, 10.2, 12, r=0)[0]
    assert fp[0] > 100 and fp[0] > 2 * fp[2], fp  # reddish
    assert fn[2] > 100 and fn[2] > 2 * fn[0], fn  # bluish
    assert np.all(_pixels(fig, rgb, ax, 20, 20, r=0) < 40)  # elsewhere: the black image
    click_ax = axes[0, 1]
    from matplotlib.collections import PathCollection
    (marker,) = [c for c in click_ax.collections if type(c) is PathCollection]  # ax.scatter's
    assert marker.get_offsets().tolist() == [[11.0, 11.0]]
    faces = marker.get_facecolors()
    assert len(faces) == 0 or np.all(faces[:, 3] == 0)  # hollow
    assert marker.get_sizes()[0] <= 50  # small (points^2)
    drawn = [a for a in click_ax.collections + click_ax.images if a is not marker]  # contours, slice, overlay
    assert len(drawn) >= 3 and marker.get_zorder() > max(a.get_zorder() for a in drawn)
    # the clicked voxel's own colour shows through the hollow marker: the FN fill at (11, 11)
    centre = _pixels(fig, rgb, click_ax, 11, 11, r=0)[0]
    assert centre[2] > 100 and centre[2] > 2 * centre[0], centre
    plt.close(fig)


def test_legend_names_every_mark():
    import matplotlib.pyplot as plt
    fig, _, _ = _render(None)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "false positive", "false negative", "ground truth", "other classes' truth", "box", "fg click", "bg click"]
    plt.close(fig)


# ---------------------------------------------------------------- report.png panels

def _case(name, boxes, dsc, harm=False):
    class_dsc = [[d] if (boxes or k) else [] for k, d in enumerate(dsc)]
    if harm:
        class_dsc[3] = [class_dsc[2][0] - 0.3]
    return CaseResult(name=name, n_classes=1, has_boxes=boxes, ran=[boxes] + [True] * 5, dsc=list(dsc),
                      nsd=list(dsc), class_dsc=class_dsc, times=[1.0] * 6)


def test_box_and_no_box_means_are_separate_curves():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from evaluation.report import kind_stage_means, plot_stage_scores
    results = [_case("a", True, [0.8, 0.8, 0.9, 0.9, 0.9, 1.0]), _case("b", True, [0.6, 0.7, 0.7, 0.8, 0.9, 0.9]),
               _case("c", False, [0.0, 0.2, 0.4, 0.5, 0.6, 0.6])]
    means = kind_stage_means([r.dsc for r in results], [True, True, False])
    assert means[True] == pytest.approx([0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    assert np.isnan(means[False][0]) and means[False][1:] == pytest.approx([0.2, 0.4, 0.5, 0.6, 0.6])
    fig, ax = plt.subplots()
    plot_stage_scores(ax, results, "dsc", "DSC")
    lines = {l.get_label(): l for l in ax.get_lines() if l.get_label().startswith("mean")}
    assert sorted(lines) == ["mean, box cases (2)", "mean, no-box cases (1)"]
    box, nobox = lines["mean, box cases (2)"], lines["mean, no-box cases (1)"]
    assert list(box.get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(box.get_ydata()) == pytest.approx([0.7, 0.75, 0.8, 0.85, 0.9, 0.95])  # no dip at click 1
    assert list(nobox.get_xdata()) == [2, 3, 4, 5, 6]
    assert list(nobox.get_ydata()) == pytest.approx([0.2, 0.4, 0.5, 0.6, 0.6])
    plt.close(fig)
    fig, ax = plt.subplots()
    plot_stage_scores(ax, results[:2], "dsc", "DSC")  # box cases only: one mean
    assert [l.get_label() for l in ax.get_lines() if l.get_label().startswith("mean")] == ["mean, box cases (2)"]
    plt.close(fig)


def test_harm_panels_say_when_there_is_no_click_harm():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from evaluation.harm import draw_harm_panels

    def texts(results):
        fig, (a, b) = plt.subplots(1, 2)
        draw_harm_panels(a, b, results)
        out = [" ".join(t.get_text() for t in ax.texts) for ax in (a, b)]
        plt.close(fig)
        return out

    steps, cases = texts([_case("a", True, [0.8, 0.8, 0.9, 0.9, 0.9, 1.0])])
    assert "no click harm\n(0 of 5 class steps)" in steps and "no click harm" in cases
    steps, cases = texts([_case("a", True, [0.8, 0.8, 0.9, 0.6, 0.9, 1.0], harm=True)])
    assert "no click harm" not in steps and "no click harm" not in cases
