"""python -m evaluation makes idle OpenMP threads sleep (as python -m infer does), unless the
environment says otherwise: a warm evaluation never imports infer.__main__."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import os, evaluation.__main__; print(os.environ.get('OMP_WAIT_POLICY'))"


def _probe(env):
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_evaluation_sets_passive_wait_policy_and_an_explicit_setting_wins():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _probe(env) == "PASSIVE"
    assert _probe(dict(env, OMP_WAIT_POLICY="ACTIVE")) == "ACTIVE"
