"""scripts/ablation.py: configurations, the table from metrics.csv rows, flag detection."""
import math

import pytest

from scripts.ablation import (TABLE_COLUMNS, default_configs, infer_accepts, markdown_table,
                              parse_config, table_row)


def test_config_parsing():
    assert parse_config('ref=--policy reference') == ("ref", "--policy reference")
    assert parse_config("plain=") == ("plain", "")
    for bad in ("no-equals", "=--no-refine", "a/b=--no-refine"):
        with pytest.raises(ValueError):
            parse_config(bad)


def test_policy_variants_only_when_the_predictor_accepts_policy():
    assert [n for n, _ in default_configs(False)] == ["default", "no-refine", "no-autozoom"]
    assert ("policy-reference", "--policy reference") in default_configs(True)
    assert ("policy-project", "--policy project") in default_configs(True)


def test_flag_detection_reads_the_real_help():
    assert infer_accepts("--no-refine") and infer_accepts("--no-autozoom")
    assert not infer_accepts("--no-such-option")


def _row(name, dsc_auc, final, d1, boxes, harmful, steps, drop):
    return {"CaseName": name, "DSC_AUC": str(dsc_auc), "NSD_AUC": "2.0", "DSC_Final": str(final),
            "DSC_1": str(d1), "HasBoxes": str(boxes), "HarmfulSteps": str(harmful),
            "ClickSteps": str(steps), "FinalDropFromBest": str(drop)}


def test_table_numbers_pool_steps_and_average_box_stage_over_boxed_cases():
    rows = [_row("a", 3.0, 0.8, 0.6, True, 1, 10, 0.1),
            _row("b", 2.0, 0.6, 0.0, False, 3, 8, 0.3)]  # no boxes: DSC_1 = 0 is not averaged
    t = table_row(rows)
    assert t["DSC_AUC"] == 2.5 and t["DSC_Final"] == pytest.approx(0.7) and t["NSD_AUC"] == 2.0
    assert t["click harm"] == pytest.approx(4 / 18) and t["harm counts"] == "4/18"
    assert t["max final drop"] == 0.3 and t["box DSC"] == 0.6
    assert t["final (box)"] == 0.8 and t["final (no-box)"] == 0.6
    assert math.isnan(table_row([rows[1]])["box DSC"])
    assert math.isnan(table_row([rows[1]])["final (box)"])
    text = markdown_table([{"config": "x", "options": "--no-refine", "seconds": 12.3, "row": t},
                           {"config": "y", "options": "", "seconds": 1.0, "row": None, "error": "exit 2"}])
    lines = text.splitlines()
    assert lines[0].startswith("| config | options | DSC_AUC")
    assert lines[2] == ("| x | `--no-refine` | 2.5000 | 2.0000 | 0.7000 | 0.8000 | 0.6000 | 22.2% (4/18) | 0.3000 "
                        "| 0.6000 | 12 |")
    assert "failed: exit 2" in lines[3]
    assert all(line.count("|") == len(TABLE_COLUMNS) + 1 for line in lines)
