"""predict.sh picks an interpreter that has torch: PYTHON when set; else python3, or on a host where
python3 lacks torch the project's .venv/bin/python next to the script; and when none has torch it
says in one line what to run instead of leaving only a ModuleNotFoundError.

Each test runs a copy of predict.sh in a temporary folder (infer/ linked in) with PATH limited to a
folder holding a stand-in ``python3``: this test's interpreter started with ``-S`` (no
site-packages, so no torch), which records that it was called.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _layout(tmp_path, venv: bool):
    """tmp/repo/{predict.sh, infer -> ROOT/infer[, .venv/bin/python]}, tmp/bin/python3 without torch."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "predict.sh", repo / "predict.sh")
    (repo / "infer").symlink_to(ROOT / "infer", target_is_directory=True)
    calls = tmp_path / "calls.txt"
    _exe(tmp_path / "bin" / "python3",
         f'#!/bin/sh\necho "python3 $*" >> "{calls}"\nexec "{sys.executable}" -S "$@"\n')
    if venv:
        _exe(repo / ".venv" / "bin" / "python",
             f'#!/bin/sh\necho "venv $*" >> "{calls}"\nexec "{sys.executable}" "$@"\n')
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(ROOT / "sample_inputs" / "CT_sample_box.npz", inputs / "case.npz")
    return repo, calls, inputs


def _run(repo, args, extra_env=None):
    shell = shutil.which("dash") or shutil.which("sh")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{repo.parent / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin", **(extra_env or {}))
    return subprocess.run([shell, str(repo / "predict.sh"), *args], env=env, cwd=str(repo.parent),
                          capture_output=True, text=True, timeout=300)


def test_stand_in_python3_really_lacks_torch(tmp_path):
    # The premise of the tests below: the stand-in cannot import torch.
    _, _, _ = _layout(tmp_path, venv=False)
    r = subprocess.run([str(tmp_path / "bin" / "python3"), "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "torch" in r.stderr


def test_uses_the_venv_next_to_it_when_python3_lacks_torch(tmp_path):
    repo, calls, inputs = _layout(tmp_path, venv=True)
    r = _run(repo, ["--inputs", str(inputs), "--outputs", str(tmp_path / "out"),
                    "--weights", str(ROOT / "weights" / "demo"), "--device", "cpu"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "out" / "case.npz").is_file()
    lines = calls.read_text().splitlines()
    assert any(l.startswith("venv -m infer") for l in lines), lines
    assert not any(l.startswith("python3 -m infer") for l in lines), lines


def test_explicit_python_wins_over_the_venv(tmp_path):
    repo, calls, _ = _layout(tmp_path, venv=True)
    r = _run(repo, ["--help"], {"PYTHON": str(tmp_path / "bin" / "python3")})
    assert r.returncode == 0, r.stdout + r.stderr  # --help needs no torch
    lines = calls.read_text().splitlines()
    assert lines == ["python3 -m infer --help"], lines


def test_one_clear_line_when_no_interpreter_has_torch(tmp_path):
    repo, _, inputs = _layout(tmp_path, venv=False)
    r = _run(repo, ["--inputs", str(inputs), "--outputs", str(tmp_path / "out"), "--device", "cpu"])
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("predict.sh: ") and "cannot import torch" in last, r.stderr
    assert "bash " in last and "scripts/setup_venv.sh" in last, last
