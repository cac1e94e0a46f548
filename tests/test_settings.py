"""Every setting of python -m infer / predict.sh is checked at start-up: an invalid one is one
error naming the option and its variable, exit status 2, before any case is read or written."""
import logging
import math
import os

import pytest

from infer.__main__ import check_settings, main, parse_args
from infer.card import CardError
from infer.policy import Policy, parse_policy
from tests.tinymodel import TINY_PATCH, tiny_arch


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith("INFER_"):
            monkeypatch.delenv(var)


def _run(tmp_path, caplog, argv):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    (inp / "case.npz").write_bytes(b"not read")  # a case that must not be opened
    with caplog.at_level(logging.ERROR, logger="infer"):
        rc = main(["--inputs", str(inp), "--outputs", str(out), "--weights", str(tmp_path / "none")] + argv)
    return rc, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR], out


BAD_OPTIONS = [
    (["--threads", "nan"], "--threads / INFER_THREADS"),
    (["--threads", "-1"], "--threads / INFER_THREADS"),
    (["--memory-gb", "inf"], "--memory-gb / INFER_MEMORY_GB"),
    (["--memory-gb", "0"], "--memory-gb / INFER_MEMORY_GB"),
    (["--seconds-per-class", "nan"], "--seconds-per-class / INFER_SECONDS_PER_CLASS"),
    (["--seconds-per-class", "-3"], "--seconds-per-class / INFER_SECONDS_PER_CLASS"),
    (["--reserve-seconds", "-1"], "--reserve-seconds / INFER_RESERVE_SECONDS"),
    (["--reserve-seconds", "five"], "--reserve-seconds / INFER_RESERVE_SECONDS"),
    (["--device", "gpu"], "--device / INFER_DEVICE"),
    (["--policy", "refrence"], "--policy / INFER_POLICY"),
    (["--policy", "reference,max_zoom=inf"], "--policy / INFER_POLICY"),
]


@pytest.mark.parametrize("argv, named", BAD_OPTIONS)
def test_an_invalid_option_stops_before_any_case(tmp_path, caplog, argv, named):
    rc, errors, out = _run(tmp_path, caplog, argv)
    assert rc == 2
    assert any(e.startswith(f"invalid setting: {named} = {argv[1]!r}") for e in errors), errors
    assert not out.exists()  # nothing written, not even the outputs folder


@pytest.mark.parametrize("var, value", [("INFER_THREADS", "nan"), ("INFER_MEMORY_GB", "inf"),
                                        ("INFER_SECONDS_PER_CLASS", "-5"), ("INFER_DEVICE", "gpu"),
                                        ("INFER_POLICY", "referense")])
def test_an_invalid_environment_variable_is_named(tmp_path, caplog, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    rc, errors, _ = _run(tmp_path, caplog, [])
    assert rc == 2 and any(var in e and repr(value) in e for e in errors), errors


def test_valid_settings_are_converted():
    args = parse_args(["--threads", "2", "--memory-gb", "12.5", "--seconds-per-class", "20",
                       "--reserve-seconds", "0", "--device", "cuda:1", "--policy", "release,mirror_last=on"])
    assert check_settings(args) == []
    assert (args.threads, args.memory_gb, args.seconds_per_class, args.reserve_seconds) == (2, 12.5, 20.0, 0.0)
    assert isinstance(args.threads, int) and isinstance(args.memory_gb, float)
    defaults = parse_args([])
    assert check_settings(defaults) == [] and defaults.threads == 0 and defaults.seconds_per_class == 15.0


def test_every_problem_is_reported_at_once():
    args = parse_args(["--threads", "x", "--memory-gb", "-1", "--device", "tpu"])
    assert len(check_settings(args)) == 3


@pytest.mark.parametrize("radius", [math.inf, math.nan, 0, -1, 65])
def test_card_click_radius_must_be_finite_and_bounded(radius):
    from infer.card import ModelCard
    with pytest.raises(CardError, match="click_radius"):
        ModelCard(architecture=tiny_arch(), input_channels=8, num_classes=2, patch_size=TINY_PATCH,
                  click_radius=radius)


@pytest.mark.parametrize("knob", ["max_zoom=inf", "max_zoom=nan", "zoom_step=inf", "context=inf",
                                  "context=nan", "mirror_gate=nan"])
def test_policy_knobs_must_be_finite(knob):
    with pytest.raises(ValueError):
        parse_policy("reference," + knob)
    assert Policy().max_zoom == 4.0  # the defaults themselves pass


def _sample_case(folder):
    import shutil
    from pathlib import Path
    folder.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "sample_inputs" / "CT_sample_box.npz", folder)


def test_a_probe_left_under_this_pid_does_not_block_the_outputs(tmp_path, caplog):
    """The writability probe was named from the PID alone; PIDs repeat in containers."""
    from pathlib import Path
    inp, out = tmp_path / "in", tmp_path / "out"
    _sample_case(inp)
    out.mkdir()
    (out / f".tmp-{os.getpid()}-probe").write_bytes(b"")  # what a killed run of this PID left
    weights = Path(__file__).resolve().parents[1] / "weights" / "demo"
    rc = main(["--inputs", str(inp), "--outputs", str(out), "--weights", str(weights), "--device", "cpu",
               "--seconds-per-class", "1000"])
    assert rc == 0 and (out / "CT_sample_box.npz").is_file()


def test_stale_temporaries_are_removed_and_fresh_ones_kept(tmp_path):
    from infer.writer import STALE_SECONDS, remove_stale_temporaries
    old_file, old_dir, fresh = tmp_path / ".tmp-1-aaaa", tmp_path / ".tmp-2-bbbb", tmp_path / ".tmp-3-cccc"
    other = tmp_path / "case.npz"
    old_file.write_bytes(b"x" * 100)
    old_dir.mkdir()
    (old_dir / "weights.pt").write_bytes(b"y")
    fresh.write_bytes(b"z")
    other.write_bytes(b"keep")
    now = 1_000_000.0
    for p in (old_file, old_dir, other):
        os.utime(p, (now - STALE_SECONDS - 1, now - STALE_SECONDS - 1))
    os.utime(fresh, (now - 5, now - 5))
    assert remove_stale_temporaries(str(tmp_path), now=now) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-3-cccc", "case.npz"]
