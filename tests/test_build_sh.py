"""build.sh without Docker: a fake `docker` and a fake `docker-squash` first on PATH record their
calls. Checks the order build -> squash -> save, what goes into the build context, the tarball and
its sha256, and every refusal (bad name, demo weights without --demo, no Docker)."""
import gzip
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE_ID = "sha256:" + "ab" * 32
IMAGE_BYTES = 4265996493

FAKE_DOCKER = r"""#!/usr/bin/env bash
# Fake docker: records every call, answers what build.sh asks.
echo "docker $*" >>"$FAKE_LOG"
case "$1" in
    info) exit "${FAKE_DOCKER_INFO_RC:-0}" ;;
    build)
        ctx="${@: -1}"
        (cd "$ctx" && find . -type f | sort) >"$FAKE_LOG.context"
        cp "$ctx/weights/model_card.json" "$FAKE_LOG.card" 2>/dev/null || true
        exit 0 ;;
    image)
        if [ "$2" = inspect ]; then
            case "$4 $5" in
                *Size*) echo "__IMAGE_BYTES__" ;;
                *python:3.13-slim-bookworm) echo "__BASE_ID__" ;;
                *:latest) [ -n "${FAKE_OLD_ID:-}" ] || exit 1; echo "$FAKE_OLD_ID" ;;
                *) exit 1 ;;
            esac
        fi
        exit 0 ;;
    save) printf 'fake image tar for %s\n' "$2"; exit 0 ;;
esac
exit 0
""".replace("__BASE_ID__", BASE_ID).replace("__IMAGE_BYTES__", str(IMAGE_BYTES))

FAKE_SQUASH = r"""#!/usr/bin/env bash
if [ "$1" = --version ]; then echo "${FAKE_SQUASH_VERSION:-1.2.2}"; exit 0; fi
echo "docker-squash $*" >>"$FAKE_LOG"
"""

# python3 -m venv DIR makes DIR/bin/pip; that pip "installs" a fake docker-squash 1.2.2.
FAKE_PYTHON3 = r"""#!/usr/bin/env bash
echo "python3 $*" >>"$FAKE_LOG"
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"
    cat >"$3/bin/pip" <<EOF
#!/usr/bin/env bash
echo "pip \$*" >>"\$FAKE_LOG"
cat >"$3/bin/docker-squash" <<'EOS'
#!/usr/bin/env bash
if [ "\$1" = --version ]; then echo 1.2.2; exit 0; fi
echo "venv-docker-squash \$*" >>"\$FAKE_LOG"
EOS
chmod +x "$3/bin/docker-squash"
EOF
    chmod +x "$3/bin/pip"
fi
"""


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def repo(tmp_path):
    """A copy of the build files in a small fake repository, with demo and production weights."""
    r = tmp_path / "repo"
    r.mkdir()
    for f in ("build.sh", "Dockerfile", ".dockerignore", "requirements-image.txt", "requirements-image-cu12.txt"):
        shutil.copy2(ROOT / f, r / f)
    (r / "predict.sh").write_text("#!/bin/sh\nexec python3 -m infer \"$@\"\n")
    (r / "infer" / "__pycache__").mkdir(parents=True)
    (r / "infer" / "__init__.py").write_text("")
    (r / "infer" / "predictor.py").write_text("# predictor\n")
    (r / "infer" / "__pycache__" / "predictor.cpython-313.pyc").write_bytes(b"\0")
    demo = r / "weights" / "demo"
    demo.mkdir(parents=True)
    (demo / "model_card.json").write_text(json.dumps({"format": "nnint-card/1", "demo": True}, indent=1))
    (demo / "weights.pt").write_bytes(b"demo tensors")
    prod = r / "weights" / "nninteractive_v1.0"
    prod.mkdir()
    (prod / "model_card.json").write_text(json.dumps({"format": "nnint-card/1", "demo": False}))
    (prod / "weights.pt").write_bytes(b"real tensors")
    # Files that must never reach the build context.
    (r / "train").mkdir()
    (r / "train" / "loop.py").write_text("")
    (r / "evaluation").mkdir()
    (r / "evaluation" / "runner.py").write_text("")
    (r / "secret.tar.gz").write_bytes(b"old tarball")
    return r


@pytest.fixture
def fake(tmp_path):
    """A bin folder with fake docker / docker-squash, and the environment that puts it first."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    _exe(bin_dir / "docker", FAKE_DOCKER)
    _exe(bin_dir / "docker-squash", FAKE_SQUASH)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log),
               TMPDIR=str(tmp_path))
    return {"bin": bin_dir, "log": log, "env": env}


def run_build(repo, fake, *args, env=None, cwd=None):
    out = subprocess.run(["bash", str(repo / "build.sh"), *args], cwd=cwd or repo, env=env or fake["env"],
                         capture_output=True, text=True, timeout=120)
    calls = fake["log"].read_text().splitlines() if fake["log"].exists() else []
    return out, calls


def _kinds(calls):
    """The calls reduced to their verbs: 'docker info', 'docker build', 'docker-squash', ..."""
    kinds = []
    for c in calls:
        w = c.split()
        kinds.append(" ".join(w[:3]) if w[:2] == ["docker", "image"] else
                     w[0] if w[0].endswith("docker-squash") else " ".join(w[:2]))
    return kinds


def test_demo_build_squashes_and_saves_in_order(repo, fake, tmp_path):
    out_dir = tmp_path / "out"
    res, calls = run_build(repo, fake, "--demo", "--name", "team-a", "--out", str(out_dir))
    assert res.returncode == 0, res.stderr
    assert _kinds(calls) == ["docker info", "docker build", "docker image inspect",
                             "docker image inspect", "docker-squash", "docker image rm",
                             "docker save", "docker image inspect"]
    build = calls[1].split()
    assert build[:2] == ["docker", "build"]
    assert _build_args(build) == ["WEIGHTS=weights", "REQUIREMENTS=requirements-image-cu12.txt"]
    assert build[build.index("-t") + 1] == "team-a:build"
    # Everything above the base image is squashed into one layer, tagged NAME:latest.
    assert calls[2].split()[-1] == "python:3.13-slim-bookworm"
    assert calls[4].split()[1:] == ["-f", BASE_ID, "-t", "team-a:latest", "team-a:build"]
    assert calls[5].split() == ["docker", "image", "rm", "team-a:build"]
    assert calls[6].split() == ["docker", "save", "team-a:latest"]

    tarball = out_dir / "team-a.tar.gz"
    assert gzip.decompress(tarball.read_bytes()) == b"fake image tar for team-a:latest\n"
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    assert f"sha256:  {sha}" in res.stdout
    assert (out_dir / "team-a.tar.gz.sha256").read_text().split() == [sha, "team-a.tar.gz"]
    assert f"({IMAGE_BYTES} bytes)" in res.stdout
    assert f"({tarball.stat().st_size} bytes)" in res.stdout
    assert not list(out_dir.glob("*.partial"))

    # The context holds the build files, infer/ without bytecode, predict.sh and the chosen weights.
    context = (fake["log"].parent / "calls.log.context").read_text().split()
    assert context == sorted(["./.dockerignore", "./Dockerfile", "./infer/__init__.py",
                              "./infer/predictor.py", "./predict.sh", "./requirements-image-cu12.txt",
                              "./weights/model_card.json", "./weights/weights.pt"])
    assert json.loads((fake["log"].parent / "calls.log.card").read_text())["demo"] is True
    # The staged context is a temporary folder, removed afterwards.
    assert not list(tmp_path.glob("build-sh.*"))


def _build_args(build_call):
    return [build_call[i + 1] for i, w in enumerate(build_call) if w == "--build-arg"]


@pytest.mark.parametrize("cuda, reqs", [("12", "requirements-image-cu12.txt"),
                                        ("13", "requirements-image.txt")])
def test_cuda_choice_picks_the_requirements_file(repo, fake, tmp_path, cuda, reqs):
    res, calls = run_build(repo, fake, "--demo", "--cuda", cuda, "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    (build,) = [c.split() for c in calls if c.startswith("docker build")]
    assert _build_args(build) == ["WEIGHTS=weights", f"REQUIREMENTS={reqs}"]
    # Only the chosen requirements file is staged, byte for byte the repository's.
    context = (fake["log"].parent / "calls.log.context").read_text().split()
    assert [f for f in context if "requirements" in f] == [f"./{reqs}"]
    assert f"(CUDA {cuda})" in res.stdout


@pytest.mark.parametrize("value, why", [("11", "--cuda '11' is not supported"),
                                        ("cu12", "--cuda 'cu12' is not supported"),
                                        (None, "--cuda needs a value")])
def test_refuses_unknown_cuda(repo, fake, value, why):
    res, calls = run_build(repo, fake, "--demo", "--cuda", *([value] if value else []))
    assert res.returncode != 0
    assert why in res.stderr
    assert calls == []  # refused before anything touches Docker


def test_missing_requirements_file_refused(repo, fake):
    (repo / "requirements-image-cu12.txt").unlink()
    res, calls = run_build(repo, fake, "--demo")
    assert res.returncode != 0 and "requirements-image-cu12.txt is missing" in res.stderr
    assert calls == []


def test_previous_image_of_the_same_name_is_dropped(repo, fake, tmp_path):
    env = dict(fake["env"], FAKE_OLD_ID="sha256:" + "cd" * 32)
    res, calls = run_build(repo, fake, "--demo", "--out", str(tmp_path), env=env)
    assert res.returncode == 0, res.stderr
    rms = [c.split()[3:] for c in calls if c.startswith("docker image rm")]
    assert rms == [["nnint:build"], ["sha256:" + "cd" * 32]]


def test_production_weights_need_no_demo_flag(repo, fake, tmp_path):
    res, calls = run_build(repo, fake, "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "docker build" in _kinds(calls)
    assert json.loads((fake["log"].parent / "calls.log.card").read_text())["demo"] is False
    assert (tmp_path / "nnint.tar.gz").is_file()  # default name


def test_release_folder_weights_accepted(repo, fake, tmp_path):
    rel = tmp_path / "nnInteractive_v1.0"
    (rel / "fold_0").mkdir(parents=True)
    (rel / "plans.json").write_text("{}")
    (rel / "fold_0" / "checkpoint_final.pth").write_bytes(b"ckpt")
    res, _ = run_build(repo, fake, "--weights", str(rel), "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    context = (fake["log"].parent / "calls.log.context").read_text().split()
    assert "./weights/fold_0/checkpoint_final.pth" in context and "./weights/plans.json" in context


def test_refuses_demo_model_without_demo_flag(repo, fake):
    res, calls = run_build(repo, fake, "--weights", str(repo / "weights" / "demo"))
    assert res.returncode != 0
    assert '"demo": true' in res.stderr and "--demo" in res.stderr
    assert calls == []


@pytest.mark.parametrize("name, why", [
    ("Team", "lower-cases"),
    ("myteam.v2", "first '.'"),
    ("my_team", "first '_'"),
    ("team/a", "not a plain image name"),
    ("-team", "not a plain image name"),
    ("", "not a plain image name"),
])
def test_refuses_names_the_organizer_would_mangle(repo, fake, name, why):
    res, calls = run_build(repo, fake, "--demo", "--name", name)
    assert res.returncode != 0
    assert why in res.stderr
    assert calls == []  # refused before anything touches Docker


def test_refuses_when_docker_does_not_answer(repo, fake):
    env = dict(fake["env"], FAKE_DOCKER_INFO_RC="1")
    res, calls = run_build(repo, fake, "--demo", env=env)
    assert res.returncode != 0
    assert "Docker does not answer" in res.stderr
    assert _kinds(calls) == ["docker info"]


def test_refuses_without_docker_command(repo, tmp_path):
    # A PATH with the usual tools but no docker at all.
    bin_dir = tmp_path / "nodocker"
    bin_dir.mkdir()
    for tool in ("bash", "env", "dirname", "grep", "sed", "mkdir", "tr", "cat", "head", "sort",
                 "cp", "find", "rm", "mktemp", "date", "gzip", "sha256sum", "wc", "cut", "mv"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env = dict(os.environ, PATH=str(bin_dir))
    res = subprocess.run([str(bin_dir / "bash"), str(repo / "build.sh"), "--demo"], cwd=repo,
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "no 'docker' command" in res.stderr


def test_refuses_missing_or_unknown_weights(repo, fake, tmp_path):
    res, calls = run_build(repo, fake, "--weights", str(tmp_path / "nope"))
    assert res.returncode != 0 and "not found" in res.stderr and calls == []
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.bin").write_bytes(b"x")
    res, calls = run_build(repo, fake, "--weights", str(tmp_path / "junk"))
    assert res.returncode != 0 and "neither a converted artifact" in res.stderr and calls == []


def test_unknown_argument_and_help(repo, fake):
    res, calls = run_build(repo, fake, "--bogus")
    assert res.returncode != 0 and "unknown argument: --bogus" in res.stderr and calls == []
    res, calls = run_build(repo, fake, "--help")
    assert res.returncode == 0 and "--weights DIR" in res.stdout and calls == []


def test_old_docker_squash_replaced_by_throwaway_venv(repo, fake, tmp_path):
    _exe(fake["bin"] / "python3", FAKE_PYTHON3)
    env = dict(fake["env"], FAKE_SQUASH_VERSION="1.1.0")
    res, calls = run_build(repo, fake, "--demo", "--out", str(tmp_path), env=env)
    assert res.returncode == 0, res.stderr
    assert "docker-squash >= 1.2.0 not found" in res.stdout
    pip = [c for c in calls if c.startswith("pip ")]
    assert pip == ["pip install -q docker-squash==1.2.2"]
    squash = [c for c in calls if "docker-squash" in c.split()[0]]
    assert len(squash) == 1 and squash[0].startswith("venv-docker-squash -f ")
    assert _kinds(calls).index("docker build") < _kinds(calls).index("venv-docker-squash") \
        < _kinds(calls).index("docker save")
    assert not list(tmp_path.glob("build-sh.*"))  # the throw-away venv is gone
