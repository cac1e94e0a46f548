"""Every entry point answers ``--help`` with its usage, exit status 0 and no side effect.

Entry points are discovered, not listed: every ``python -m`` module of ``infer``, ``evaluation``,
``train`` and ``scripts`` (a package's ``__main__.py`` or a module with an
``if __name__ == "__main__":`` guard) and every ``*.sh`` at the top level, in ``scripts/`` and in
``tests/``. A new script without ``--help`` fails here.

Each one runs in its own copy of the repository (code and docs; no weights, no venv), with HOME,
TMPDIR and the working directory inside the test's temporary folder, bytecode writing off, and
fake ``docker``, ``docker-squash``, ``pip``, ``pip3``, ``apt-get``, ``sudo``, ``curl``, ``wget`` and
``torchrun`` first on PATH: each records its call and fails. A side effect shows as a recorded
call, a file added, removed or changed in the copy, or anything left in HOME or TMPDIR.
"""
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("infer", "evaluation", "train", "scripts")
MAIN_GUARD = re.compile(r"""^if __name__ == ["']__main__["']:""", re.M)
FAKE_TOOLS = ("docker", "docker-squash", "pip", "pip3", "apt-get", "sudo", "curl", "wget", "torchrun")
# what the copy leaves out: large or machine-made, never needed to print a usage
SKIP = shutil.ignore_patterns(".git", ".venv*", "venv", "weights", "sample_inputs", "runs", "eval_out",
                              "outputs", "__pycache__", "*.pyc", ".pytest_cache", "gpu_check_out", "*.tar.gz")
TIMEOUT = 120


def python_entry_points() -> list[str]:
    """Module names runnable with ``python -m``."""
    mods = []
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).glob("*.py")):
            if p.name == "__main__.py":
                mods.append(pkg)
            elif p.name != "__init__.py" and MAIN_GUARD.search(p.read_text(encoding="utf-8")):
                mods.append(f"{pkg}.{p.stem}")
    return mods


def shell_entry_points() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for d in (ROOT, ROOT / "scripts", ROOT / "tests")
                  for p in d.glob("*.sh"))


ENTRY_POINTS = [("python", m) for m in python_entry_points()] + [("sh", s) for s in shell_entry_points()]


def _snapshot(folder: Path) -> dict:
    """path -> (size, mtime_ns) of every file and folder under ``folder``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            out[str(p.relative_to(folder))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def _command(repo: Path, kind: str, name: str) -> list[str]:
    if kind == "python":
        return [sys.executable, "-m", name, "--help"]
    # the interpreter each script's header names (predict.sh and tests/smoke.sh: POSIX sh)
    first = (repo / name).read_text(encoding="utf-8").splitlines()[0]
    shell = "sh" if first.strip() in ("#!/bin/sh", "#!/usr/bin/env sh") else "bash"
    return [shell, name, "--help"]


def _run_help(base: Path, kind: str, name: str, src: Path = ROOT) -> dict:
    """Run one entry point's ``--help`` in a fresh copy of ``src`` under ``base``; what it printed
    and what it left."""
    repo, home, tmp, fake = base / "repo", base / "home", base / "tmp", base / "bin"
    shutil.copytree(src, repo, ignore=SKIP, symlinks=True)
    for d in (home, tmp, fake):
        d.mkdir()
    calls = base / "calls.log"
    for tool in FAKE_TOOLS:
        f = fake / tool
        f.write_text(f'#!/bin/sh\necho "{tool} $*" >>"{calls}"\nexit 1\n')
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env.update(PATH=f"{fake}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", HOME=str(home),
               TMPDIR=str(tmp), PYTHON=sys.executable, PYTHONDONTWRITEBYTECODE="1", PIP_NO_INDEX="1")
    before = _snapshot(repo)
    try:
        res = subprocess.run(_command(repo, kind, name), cwd=repo, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        rc, out = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
    after = _snapshot(repo)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return {"rc": rc, "output": out if isinstance(out, str) else out.decode(errors="replace"),
            "calls": calls.read_text() if calls.exists() else "",
            "changed": changed, "home": sorted(os.listdir(home)), "tmp": sorted(os.listdir(tmp))}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every entry point's ``--help``, four at a time (most of the time is interpreter start-up)."""
    base = tmp_path_factory.mktemp("help")

    def one(i_entry):
        i, (kind, name) = i_entry
        return (kind, name), _run_help(base / f"e{i}", kind, name)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(one, enumerate(ENTRY_POINTS)))


def test_discovery_finds_the_known_entry_points():
    """The globbing above finds the entry points named in the README and docs (if it found
    nothing, every parametrized test below would pass vacuously)."""
    mods = python_entry_points()
    for m in ("infer", "infer.convert", "evaluation", "train", "train.widen", "scripts.bench",
              "scripts.bench_probe", "scripts.synthetic", "scripts.prepare_weights"):
        assert m in mods, m
    assert "scripts.varied" not in mods  # flags for scripts.synthetic, not runnable itself
    assert {"build.sh", "predict.sh", "tests/smoke.sh", "scripts/ci_docker.sh",
            "scripts/setup_venv.sh", "scripts/setup_reference_venv.sh",
            "scripts/gpu_check.sh"} <= set(shell_entry_points())


def test_the_guard_sees_a_side_effect(tmp_path):
    """A script that calls docker, writes into the repository and into TMPDIR is caught on all
    three counts (the checks below can fail)."""
    src = tmp_path / "src"
    (src / "scripts").mkdir(parents=True)
    (src / "scripts" / "bad.sh").write_text(
        '#!/usr/bin/env bash\necho "usage: bad"\ndocker build . || true\n'
        'touch "$(dirname "$0")/made_by_help"\nmktemp >/dev/null\n')
    got = _run_help(tmp_path / "run", "sh", "scripts/bad.sh", src=src)
    assert got["rc"] == 0 and "usage" in got["output"]
    assert got["calls"].startswith("docker build")
    assert "scripts/made_by_help" in got["changed"]
    assert len(got["tmp"]) == 1


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=[n for _, n in ENTRY_POINTS])
def test_help_prints_usage_and_does_nothing_else(results, entry):
    got = results[entry]
    out = got["output"]
    assert got["rc"] == 0, f"exit status {got['rc']}:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    assert re.search(r"\busage\b", out, re.I), f"no usage line:\n{out[-3000:]}"
    assert got["calls"] == "", f"called outside tools:\n{got['calls']}"
    assert got["changed"] == [], f"changed files in the repository: {got['changed']}"
    assert got["home"] == [] and got["tmp"] == [], f"left files: HOME {got['home']}, TMPDIR {got['tmp']}"
