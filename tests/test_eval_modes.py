"""Stage bookkeeping (evaluation.runner), the CSV / PNG report, and cold vs warm runs."""
import csv
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation.report import COLUMNS, write_csv
from evaluation.runner import REPO_ROOT, ColdRunner, WarmRunner, evaluate_case

import infer.npz as io  # noqa: E402

SHAPE = (20, 20, 20)
BOXES = [{"z_min": 2, "z_max": 8, "z_mid": 5, "z_mid_y_min": 2, "z_mid_y_max": 8,
          "z_mid_x_min": 2, "z_mid_x_max": 8},
         {"z_min": 12, "z_max": 16, "z_mid": 14, "z_mid_y_min": 12, "z_mid_y_max": 16,
          "z_mid_x_min": 12, "z_mid_x_max": 16}]


def make_gts():
    gts = np.zeros(SHAPE, np.uint8)
    gts[2:9, 2:9, 2:9] = 1  # 7^3, centre (5, 5, 5)
    gts[12:17, 12:17, 12:17] = 2  # 5^3, centre (14, 14, 14)
    return gts


def write_case(folder, name="case.npz", boxes=True, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"imgs": np.arange(np.prod(SHAPE), dtype=np.uint32).reshape(SHAPE).astype(np.uint8),
              "spacing": np.array([2.0, 1.0, 1.0])}
    if boxes:
        arrays["boxes"] = BOXES  # stored by np.savez as an object array, as the organizer's files
    arrays.update(extra)
    np.savez(folder / name, **arrays)
    return folder / name


class ScriptedRunner:
    """Writes a fixed output per call (None: writes nothing) and records each stage's input."""

    def __init__(self, outputs, seconds=1.0):
        self.outputs, self.seconds = list(outputs), seconds
        self.inputs, self.keys, self.outputs_seen = [], [], []

    def __call__(self, inputs_dir, outputs_dir):
        (path,) = sorted(Path(inputs_dir).glob("*.npz"))
        self.outputs_seen.append(sorted(os.listdir(outputs_dir)))
        with np.load(path, allow_pickle=False) as f:
            self.keys.append(list(f.files))
        self.inputs.append(io.read_case(path))
        segs = self.outputs[len(self.inputs) - 1]
        if segs is not None:
            np.savez(Path(outputs_dir) / path.name, segs=segs)
        return self.seconds


def scripted_outputs():
    gts = make_gts()
    s1 = gts.copy()
    s1[4:7, 4:7, 4:7] = 0  # class 1 misses a 3^3 core: fg click at (5, 5, 5); class 2 perfect
    s2 = gts.copy()
    s2[2:5, 13:16, 13:16] = 2  # class 2 false positive 3^3 centred (3, 14, 14): bg click
    return [s1, s2, None, gts, gts, gts]  # stage 3 crashes: stage 4 clicks come from zeros


def test_clicks_and_prev_pred_are_rewritten_as_the_organizer_does(tmp_path):
    image = write_case(tmp_path / "images")
    runner = ScriptedRunner(scripted_outputs())
    r = evaluate_case(image, _gts_file(tmp_path), runner, tmp_path / "work", log=lambda m: None)
    ins = runner.inputs
    assert len(ins) == 6 and runner.outputs_seen == [[]] * 6  # outputs/ emptied before every stage
    # box stage: the image file as it is
    assert runner.keys[0] == ["imgs", "spacing", "boxes"]
    assert ins[0]["boxes"] == BOXES and ins[0]["clicks"] is None
    # click stages: organizer's key order; boxes carried along unchanged
    for k in range(1, 6):
        assert runner.keys[k] == ["imgs", "spacing", "clicks", "clicks_order", "prev_pred", "boxes"]
        assert ins[k]["boxes"] == BOXES
        np.testing.assert_array_equal(ins[k]["imgs"], ins[0]["imgs"])
    outs = scripted_outputs()
    np.testing.assert_array_equal(ins[1]["prev_pred"], outs[0])
    np.testing.assert_array_equal(ins[2]["prev_pred"], outs[1])
    np.testing.assert_array_equal(ins[3]["prev_pred"], 0)  # stage 3 wrote nothing
    assert ins[1]["clicks_order"] == [["fg"], [None]]
    assert ins[2]["clicks_order"] == [["fg", None], [None, "bg"]]
    assert ins[3]["clicks_order"] == [["fg", None, "fg"], [None, "bg", "fg"]]
    assert ins[5]["clicks_order"] == [["fg", None, "fg", None, None], [None, "bg", "fg", None, None]]
    assert ins[5]["clicks"] == [{"fg": [[5, 5, 5], [5, 5, 5]], "bg": []},
                                {"fg": [[14, 14, 14]], "bg": [[3, 14, 14]]}]
    # scores: stage 3 is an all-zero prediction; stages 4-6 perfect
    assert r.missing[2] == "no output file" and r.n_missing == 1
    assert r.dsc[2] == 0.0 and r.nsd[2] == 0.0
    assert r.dsc[3:] == [1.0, 1.0, 1.0] and r.nsd[3:] == [1.0, 1.0, 1.0]
    d1 = 2 * (343 - 27) / (343 - 27 + 343)  # class 1 of stage 1 by hand; class 2 perfect
    assert r.dsc[0] == pytest.approx((d1 + 1.0) / 2)
    assert r.times == [1.0] * 6 and not r.over_budget


def _gts_file(tmp_path):
    (tmp_path / "gts").mkdir(exist_ok=True)
    np.savez(tmp_path / "gts" / "case.npz", gts=make_gts(), spacing=np.array([2.0, 1.0, 1.0]))
    return tmp_path / "gts" / "case.npz"


def test_case_without_boxes_skips_the_box_stage(tmp_path):
    image = write_case(tmp_path / "images", boxes=False)
    gts = make_gts()
    runner = ScriptedRunner([gts] * 5)
    r = evaluate_case(image, _gts_file(tmp_path), runner, tmp_path / "work", log=lambda m: None)
    assert len(runner.inputs) == 5  # no run for the box stage
    assert not r.ran[0] and r.times[0] == 0.0 and r.dsc[0] == 0 and r.nsd[0] == 0
    assert runner.keys[0] == ["imgs", "spacing", "clicks", "clicks_order", "prev_pred"]
    np.testing.assert_array_equal(runner.inputs[0]["prev_pred"], 0)
    # first clicks from an empty prediction: the centre of each class
    assert runner.inputs[0]["clicks"] == [{"fg": [[5, 5, 5]], "bg": []}, {"fg": [[14, 14, 14]], "bg": []}]
    assert r.dsc[1:] == [1.0] * 5 and r.dsc_auc == 4.0 and r.nsd_auc == 4.0


def test_mid_session_file_restarts_from_the_box_stage(tmp_path):
    image = write_case(tmp_path / "images", prev_pred=np.ones(SHAPE, np.uint8),
                       clicks=[{"fg": [[1, 1, 1]], "bg": []}, {"fg": [], "bg": []}],
                       clicks_order=[["fg"], [None]])
    notes = []
    runner = ScriptedRunner([make_gts()] * 6)
    r = evaluate_case(image, _gts_file(tmp_path), runner, tmp_path / "work", log=notes.append)
    assert runner.keys[0] == ["imgs", "spacing", "boxes"]
    assert runner.inputs[0]["boxes"] == BOXES
    assert runner.inputs[1]["clicks_order"] == [[None], [None]]  # fresh clicks only
    assert any("mid-session" in n for n in notes) and any("mid-session" in n for n in r.notes)


def test_training_layout_keeps_gts_in_the_stage_inputs(tmp_path):
    # organizer: without a gts folder the image's own gts is used and re-saved with the clicks
    image = write_case(tmp_path / "images", gts=make_gts())
    runner = ScriptedRunner([make_gts()] * 6)
    evaluate_case(image, None, runner, tmp_path / "work", log=lambda m: None)
    assert runner.keys[1] == ["imgs", "gts", "spacing", "clicks", "clicks_order", "prev_pred", "boxes"]


def test_over_budget_case_scores_zero_and_is_flagged(tmp_path):
    image = write_case(tmp_path / "images")
    r = evaluate_case(image, _gts_file(tmp_path), ScriptedRunner([make_gts()] * 6, seconds=31.0),
                      tmp_path / "work", log=lambda m: None)
    assert r.total_time == 186.0 and r.budget_s == 180.0 and r.over_budget  # 2 classes
    write_csv([r], tmp_path / "m.csv")
    write_csv([r], tmp_path / "raw.csv", zero_over_budget=False)
    row = next(csv.DictReader(open(tmp_path / "m.csv")))
    raw = next(csv.DictReader(open(tmp_path / "raw.csv")))
    assert list(row) == COLUMNS and COLUMNS[:2] == ["CaseName", "TotalRunningTime"]
    assert row["OverBudget"] == "True" and row["DSC_AUC"] == "0.0" and row["NSD_Final"] == "0.0"
    assert row["DSC_6"] == "1.0" and raw["DSC_AUC"] == "4.0" and raw["DSC_Final"] == "1.0"
    assert row["num_class"] == "2" and row["runtime_upperbound"] == "180.0"


STUB = '''
import os, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, {repo!r})
from infer.npz import read_case
from infer.writer import write_segs


def predict(case):
    """Fills each box, then paints / erases a 5^3 cube at the newest click of each class."""
    segs = np.zeros(case["imgs"].shape, np.uint8) if case["prev_pred"] is None else case["prev_pred"].copy()
    if case["prev_pred"] is None:
        for k, b in enumerate(case["boxes"] or []):
            segs[b["z_min"]:b["z_max"] + 1, b["z_mid_y_min"]:b["z_mid_y_max"] + 1,
                 b["z_mid_x_min"]:b["z_mid_x_max"] + 1] = k + 1
    for k, order in enumerate(case["clicks_order"] or []):
        if order and order[-1] is not None:
            z, y, x = case["clicks"][k][order[-1]][-1]
            sl = tuple(slice(max(c - 2, 0), c + 3) for c in (z, y, x))
            part = segs[sl]
            part[part == k + 1] = 0
            if order[-1] == "fg":
                part[...] = k + 1
    return segs


if __name__ == "__main__":
    for p in sorted(Path(os.environ["INFER_INPUTS"]).glob("*.npz")):
        write_segs(Path(os.environ["INFER_OUTPUTS"]) / p.name, predict(read_case(p)))
'''


def _stub(tmp_path):
    (tmp_path / "stub_predict.py").write_text(STUB.format(repo=str(REPO_ROOT)))
    (tmp_path / "predict.sh").write_text(f'exec "{sys.executable}" "{tmp_path / "stub_predict.py"}"\n')
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib
        module = importlib.import_module("stub_predict")
        return importlib.reload(module).predict
    finally:
        sys.path.remove(str(tmp_path))


def _boxes_off(b):
    return {**b, "z_mid_y_max": b["z_mid_y_max"] - 2, "z_mid_x_min": b["z_mid_x_min"] + 1}


@pytest.mark.slow
def test_cli_cold_mode_matches_warm_mode_with_a_stub_predictor(tmp_path):
    from evaluation.__main__ import main
    predict = _stub(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    np.savez(images / "a.npz", imgs=np.zeros(SHAPE, np.uint8),
             spacing=np.array([2.0, 1.0, 1.0]), boxes=[_boxes_off(b) for b in BOXES])
    np.savez(images / "b.npz", imgs=np.zeros(SHAPE, np.uint8), spacing=np.array([1.0, 0.5, 0.5]))
    gts_dir = tmp_path / "gts"
    gts_dir.mkdir()
    for n in ("a.npz", "b.npz"):
        np.savez(gts_dir / n, gts=make_gts())
    out = tmp_path / "out"
    assert main(["--images", str(images), "--gts", str(gts_dir), "--out", str(out),
                 "--predict-sh", str(tmp_path / "predict.sh")]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["CaseName"] for r in rows] == ["a.npz", "b.npz"]
    assert (out / "report.png").stat().st_size > 10_000
    warm = WarmRunner(predict)
    for row in rows:
        r = evaluate_case(images / row["CaseName"], gts_dir / row["CaseName"], warm,
                          tmp_path / "warm", log=lambda m: None)
        assert [float(row[f"DSC_{k}"]) for k in range(1, 7)] == r.dsc
        assert [float(row[f"NSD_{k}"]) for k in range(1, 7)] == r.nsd
        assert float(row["DSC_AUC"]) == r.dsc_auc and float(row["NSD_AUC"]) == r.nsd_auc
        assert row["MissingOutputs"] == "0"
    assert rows[1]["HasBoxes"] == "False" and float(rows[1]["RunningTime_1"]) == 0.0
    assert 0.0 < float(rows[0]["DSC_1"]) < 1.0 < float(rows[0]["DSC_AUC"])


SAMPLES = sorted((REPO_ROOT / "sample_inputs").glob("*.npz"))


@pytest.mark.slow
@pytest.mark.skipif(not (REPO_ROOT / "predict.sh").is_file(), reason="predict.sh not in this tree yet")
@pytest.mark.skipif(not (REPO_ROOT / "infer" / "predictor.py").is_file(),
                    reason="infer/predictor.py not in this tree yet")
@pytest.mark.skipif(not SAMPLES or not (REPO_ROOT / "sample_inputs" / "gts").is_dir(),
                    reason="sample_inputs/*.npz with sample_inputs/gts/ not in this tree yet")
def test_cold_and_warm_give_the_same_metrics_on_sample_inputs(tmp_path):
    """The bundled model, first sample case: cold (sh predict.sh per stage) == warm (one
    in-process Predictor), stage by stage."""
    image = SAMPLES[0]
    gts = REPO_ROOT / "sample_inputs" / "gts" / image.name
    weights = os.environ.get("INFER_WEIGHTS", str(REPO_ROOT / "weights"))
    cold = evaluate_case(image, gts, ColdRunner(weights=weights, device="cpu"), tmp_path / "cold",
                         log=lambda m: None)
    warm = evaluate_case(image, gts, WarmRunner.from_weights(weights, device="cpu"),
                         tmp_path / "warm", log=lambda m: None)
    assert cold.n_missing == 0 and warm.n_missing == 0
    assert cold.dsc == warm.dsc and cold.nsd == warm.nsd
