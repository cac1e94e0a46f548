"""The smoke script passes on sample_inputs with the bundled model, and fails when an output is wrong."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(weights=None, env_extra=None):
    env = {**os.environ, "PYTHON": sys.executable, **(env_extra or {})}
    cmd = ["sh", str(ROOT / "tests" / "smoke.sh")] + ([str(weights)] if weights else [])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "weights" / "demo" / "model_card.json").exists(), reason="no bundled demo model")
def test_smoke_script_passes_on_sample_inputs():
    r = _run()
    assert r.returncode == 0, r.stdout + r.stderr
    n = len([p for p in (ROOT / "sample_inputs").glob("*.npz")])
    assert n >= 3 and f"{n} case(s) ok" in r.stdout


@pytest.mark.slow
def test_smoke_script_fails_when_predict_writes_nothing(tmp_path):
    # An interpreter that silently does nothing for `-m infer` (and runs everything else): the
    # script must notice the missing outputs.
    fake_py = tmp_path / "python"
    fake_py.write_text(f"#!/bin/sh\ncase \"$2\" in infer) exit 0;; esac\nexec {sys.executable} \"$@\"\n")
    fake_py.chmod(0o755)
    r = _run(weights=tmp_path, env_extra={"PYTHON": str(fake_py)})
    assert r.returncode != 0 and "no output" in r.stdout
