"""Predictor options passed through an evaluation run (evaluation.predict_args, ColdRunner)."""
import pytest

from evaluation.predict_args import split_predict_args, warm_options
from evaluation.runner import ColdRunner


def test_predict_args_are_split_and_mapped_to_predictor_arguments():
    pytest.importorskip("torch")
    tokens = split_predict_args(["--no-refine", "--no-autozoom --threads 1"])
    assert tokens == ["--no-refine", "--no-autozoom", "--threads", "1"]
    assert warm_options(tokens) == ({"refine": False, "autozoom": False}, 1)
    assert warm_options([]) == ({}, 0)
    with pytest.raises(ValueError, match="time budget"):
        warm_options(["--seconds-per-class", "3"])
    with pytest.raises(SystemExit):
        warm_options(["--no-such-flag"])


def test_cold_mode_appends_the_options_to_predict_sh(tmp_path):
    script = tmp_path / "predict.sh"
    script.write_text('printf "%s\\n" "$@" > "$INFER_OUTPUTS/args.txt"\n')
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    ColdRunner(script, extra_args=split_predict_args(["--policy 'project,refine=none'"]))(
        tmp_path / "in", tmp_path / "out")
    assert (tmp_path / "out" / "args.txt").read_text().splitlines() == ["--policy", "project,refine=none"]
