"""The submission image end to end, with real Docker (marker ``docker``; skipped when no daemon
answers). CI runs it through scripts/ci_docker.sh.

``./build.sh --demo`` builds, squashes and saves the image; the tarball is loaded the way the
organizer does (image name from the tarball name); then:

- the tarball holds NAME:latest, one layer on top of the base, no deleted-file markers in it, and
  the image is within 10 % of its floor (base + torch with its NVIDIA libraries + weights);
- the image's Python holds only the standard library, torch and numpy (plus torch's one import
  dependency typing_extensions), and running the predictor imports nothing else;
- ``python -m evaluation --docker`` runs all six stages of every sample case with the organizer's
  command line, every output is present and valid, and every per-stage score equals the score of
  the same model run without Docker (``python -m evaluation`` cold mode, same weights, CPU);
- one stage runs with ``--network none``;
- cold-start timings on CPU, as ratios to ``docker run IMAGE python -c "import torch"``;
- ``scripts/server_check.py --image``: the image's torch runs on the evaluation server's GPU
  (compute capability 7.5) and CUDA 12.1 driver, and its infer/ uses no bfloat16.

Numbers are printed in the terminal summary, with how long the whole image test took.
"""
from __future__ import annotations

import csv
import gzip
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from evaluation.docker_runner import docker_command, load_image, run_stage_docker

ROOT = Path(__file__).resolve().parents[1]
NAME = "e2etest"
DEMO = ROOT / "weights" / "demo"
SAMPLES = ROOT / "sample_inputs"
BASE = "python:3.13-slim-bookworm"
# What ./build.sh installs by default (--cuda 12: torch 2.8.0 for CUDA 12.8).
REQUIREMENTS = "requirements-image-cu12.txt"
# What the image's own Python may import: the predictor package and its runtime (torch ships
# torchgen; `import torch` needs typing_extensions). sitecustomize is the base image's own hook
# (Debian's interpreter has one), not something the image adds; the test checks where it lives.
ALLOWED_IMPORTS = {"infer", "torch", "torchgen", "numpy", "typing_extensions", "sitecustomize"}
ABSENT = ["cc3d", "edt", "scipy", "evaluation", "train", "tests", "scripts", "tqdm", "matplotlib",
          "huggingface_hub", "sympy", "triton", "networkx", "jinja2", "pip_audit"]


def _no_docker_reason() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command on PATH (CI: bash scripts/ci_docker.sh sets Docker up)"
    try:
        ok = subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    return None if ok else "the Docker daemon does not answer (CI: bash scripts/ci_docker.sh starts it)"


def _missing_pieces() -> str | None:
    missing = [str(p.relative_to(ROOT)) for p in (DEMO / "model_card.json", ROOT / "predict.sh",
                                                  ROOT / "infer" / "__main__.py") if not p.exists()]
    if not sorted(SAMPLES.glob("*.npz")):
        missing.append("sample_inputs/*.npz")
    return f"not in the tree yet: {', '.join(missing)}" if missing else None


_reason = _no_docker_reason() or _missing_pieces()
pytestmark = [pytest.mark.docker, pytest.mark.skipif(_reason is not None, reason=_reason or "")]

REPORT: list[str] = []


def report(line: str) -> None:
    REPORT.append(line)


def docker(*args, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], check=check, capture_output=True, text=True, **kw)


def _print_report(config, seconds: float) -> None:
    """Print the collected numbers to the terminal, past pytest's output capturing."""
    lines = ["", "image end-to-end:"] + [f"  {x}" for x in REPORT] + [
        f"  the image test took {seconds:.0f} s (build, squash, save, load, runs)"]
    capman = config.pluginmanager.get_plugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n".join(lines), flush=True)


@pytest.fixture(autouse=True, scope="module")
def _only_when_asked(request):
    """Minutes of build and runs: only under `-m docker` (scripts/ci_docker.sh), not in a plain
    `pytest` run that happens to find a Docker daemon."""
    if "docker" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("real-Docker end-to-end test: run it with -m docker (bash scripts/ci_docker.sh)")


@pytest.fixture(autouse=True)
def _timed(request):
    t0 = time.perf_counter()
    yield
    report(f"{request.node.name}: {time.perf_counter() - t0:.0f} s")


@pytest.fixture(scope="module")
def image(request, tmp_path_factory):
    """Build with ./build.sh --demo, drop the image from the daemon, load the tarball back."""
    t_start = time.perf_counter()
    out = tmp_path_factory.mktemp("image")
    proc = subprocess.run(["bash", str(ROOT / "build.sh"), "--demo", "--name", NAME, "--out", str(out)],
                          capture_output=True, text=True)
    build_s = time.perf_counter() - t_start
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for line in proc.stdout.splitlines():
        if line.startswith(("build.sh: done", "image:", "tarball:", "sha256:")):
            report(line)
    report(f"build.sh --demo wall time {build_s:.0f} s")
    tarball = out / f"{NAME}.tar.gz"
    docker("image", "rm", f"{NAME}:latest")
    t0 = time.perf_counter()
    tag = load_image(tarball)
    report(f"docker load of the tarball {time.perf_counter() - t0:.0f} s")
    assert tag == f"{NAME}:latest"
    yield {"tag": tag, "tarball": tarball}
    docker("image", "rm", "-f", tag, check=False)
    _print_report(request.config, time.perf_counter() - t_start)


def _scan_tarball(path: Path) -> dict:
    """Stream a `docker save` tarball: manifest, and per layer member its file names and the
    whiteout markers ('.wh.*') it holds."""
    layers, manifest = {}, None
    with gzip.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as outer:
        for member in outer:
            if not member.isfile():
                continue
            f = outer.extractfile(member)
            if member.name == "manifest.json":
                manifest = json.load(f)
                continue
            if member.size < 1024:
                continue
            names, whiteouts = [], []
            try:
                with tarfile.open(fileobj=f, mode="r|") as inner:
                    for m in inner:
                        names.append(m.name)
                        if m.name.rsplit("/", 1)[-1].startswith(".wh."):
                            whiteouts.append(m.name)
            except tarfile.ReadError:
                continue  # a config or other non-layer file
            layers[member.name] = {"names": names, "whiteouts": whiteouts}
    return {"manifest": manifest, "layers": layers}


def test_tarball_is_one_squashed_layer_on_the_base(image):
    scan = _scan_tarball(image["tarball"])
    (entry,) = scan["manifest"]
    assert entry["RepoTags"] == [f"{NAME}:latest"]
    base_layers = json.loads(docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", BASE).stdout)
    assert len(entry["Layers"]) == len(base_layers) + 1, entry["Layers"]
    top = scan["layers"][entry["Layers"][-1]]
    assert top["whiteouts"] == []
    names = {n.rstrip("/") for n in top["names"]}
    workspace = {n.split("/")[1] for n in names if n.startswith("workspace/") and n.count("/") >= 1}
    assert workspace == {"infer", "predict.sh", "weights"}
    assert not [n for n in names if "__pycache__" in n and n.startswith("workspace/")]
    assert "tmp/requirements-image.txt" not in names
    assert not [n for n in names if n.startswith(("root/.cache", "var/cache/apt", "var/lib/apt/lists"))]
    report(f"tarball: {len(base_layers)} base layer(s) + 1 squashed layer, {len(top['names'])} "
           f"entries, 0 whiteouts")


INSPECT = r"""
import importlib.metadata as md, importlib.util, json, os, sys
dists = {d.metadata["Name"].lower().replace("_", "-"): d for d in md.distributions()}
def size(names):
    total = 0
    for n in names:
        for f in dists[n].files or []:
            p = dists[n].locate_file(f)
            if os.path.isfile(p) and not os.path.islink(p):
                total += os.path.getsize(p)
    return total
torch_nvidia = [n for n in dists if n == "torch" or n.startswith("nvidia-")]
weights = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk("/workspace/weights") for f in fs) \
    if os.path.isdir("/workspace/weights") else 0
print(json.dumps({"dists": sorted(dists), "torch_nvidia_bytes": size(torch_nvidia), "weights_bytes": weights,
                  "present": [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None],
                  "workspace": sorted(os.listdir("/workspace")) if os.path.isdir("/workspace") else [],
                  "infer": sorted(os.listdir("/workspace/infer")) if os.path.isdir("/workspace/infer") else [],
                  "cache": [p for p in ("/root/.cache", "/tmp/requirements-image.txt") if os.path.exists(p)]}))
"""


def _inspect(tag: str) -> dict:
    out = docker("run", "--rm", "--network", "none", "--entrypoint", "python", tag, "-c", INSPECT, *ABSENT)
    return json.loads(out.stdout)


def test_image_holds_only_python_torch_numpy_and_the_predictor(image):
    img, base = _inspect(image["tag"]), _inspect(BASE)
    reqs = {ln.split("==")[0].strip().lower().replace("_", "-")
            for ln in (ROOT / REQUIREMENTS).read_text().splitlines()
            if ln.strip() and not ln.startswith("#")}
    assert set(img["dists"]) - set(base["dists"]) == reqs
    assert img["present"] == [], f"importable in the image: {img['present']}"
    assert img["workspace"] == ["infer", "predict.sh", "weights"]
    # infer/ is the runtime package as in the repository (no benchmark or tooling modules)
    assert img["infer"] == sorted(p.name for p in (ROOT / "infer").glob("*.py"))
    assert not [n for n in img["infer"] if "bench" in n]
    assert img["cache"] == []

    image_bytes = int(docker("image", "inspect", "--format", "{{.Size}}", image["tag"]).stdout)
    base_bytes = int(docker("image", "inspect", "--format", "{{.Size}}", BASE).stdout)
    floor = base_bytes + img["torch_nvidia_bytes"] + img["weights_bytes"]
    ratio = image_bytes / floor
    mib = 2 ** 20
    report(f"image {image_bytes / mib:.0f} MiB; floor {floor / mib:.0f} MiB = base {base_bytes / mib:.0f} "
           f"+ torch and NVIDIA libs {img['torch_nvidia_bytes'] / mib:.0f} + weights "
           f"{img['weights_bytes'] / mib:.1f}; image / floor = {ratio:.3f}")
    assert ratio <= 1.10


AUDIT = r"""
import json, sys, sysconfig
from infer.__main__ import main  # what `python -m infer` runs, without its final os._exit
code = main([])
std = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
# __mp_main__: multiprocessing's alias of __main__, made when it is imported
tops = sorted({m.split(".")[0] for m in list(sys.modules)} - std - {"__main__", "__mp_main__"})
where = {m: getattr(sys.modules[m], "__file__", None) for m in tops}
print(json.dumps({"code": code, "imported": where, "stdlib": sysconfig.get_paths()["stdlib"]}))
"""


def test_predictor_in_the_image_imports_nothing_else(image, tmp_path):
    case = sorted(SAMPLES.glob("*.npz"))[0]
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    outputs.mkdir()
    shutil.copy(case, inputs / case.name)
    out = docker("run", "--rm", "--network", "none", "-v", f"{inputs}/:/workspace/inputs/",
                 "-v", f"{outputs}/:/workspace/outputs/", image["tag"], "python", "-c", AUDIT)
    audit = json.loads(out.stdout.strip().splitlines()[-1])
    assert audit["code"] in (None, 0)
    imported = audit["imported"]
    assert set(imported) <= ALLOWED_IMPORTS, sorted(set(imported) - ALLOWED_IMPORTS)
    if "sitecustomize" in imported:  # the interpreter's own hook, not ours
        assert not imported["sitecustomize"].startswith("/workspace")
    assert imported["infer"].startswith("/workspace/infer/")
    assert (outputs / case.name).is_file()
    report(f"modules the predictor imported in the image, besides the standard library: {sorted(imported)}")


def test_image_torch_runs_on_the_evaluation_server(image):
    """scripts/server_check.py on the built image (no GPU needed): its torch build carries SASS
    for compute capability 7.5 (Quadro RTX 5000) and 9.0, its CUDA 12.x runtime runs on the
    server's CUDA 12.1 driver, and the image's infer/ uses no bfloat16."""
    r = subprocess.run([sys.executable, "-m", "scripts.server_check", "--image", image["tag"]], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    for line in r.stdout.splitlines()[1:]:
        report(f"server check: {line}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "infer/ at /workspace/infer" in r.stdout


def _check_output(path: Path, case: Path) -> None:
    with np.load(case, allow_pickle=False) as f:
        shape = f["imgs"].shape
    with np.load(path, allow_pickle=False) as f:
        assert list(f.keys()) == ["segs"]
        segs = f["segs"]
    assert segs.shape == shape and segs.dtype in (np.uint8, np.uint16)


def test_one_stage_with_network_none(image, tmp_path):
    case = sorted(SAMPLES.glob("*.npz"))[0]
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    shutil.copy(case, inputs / case.name)
    seconds = run_stage_docker(image["tag"], inputs, outputs, gpus=False, network_none=True)
    _check_output(outputs / case.name, case)
    report(f"{case.name} box stage with --network none: {seconds:.1f} s")


def _evaluate(tmp_path: Path, name: str, *mode) -> list[dict]:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "evaluation", "--images", str(SAMPLES), "--out", str(out), *mode]
    if (SAMPLES / "gts").is_dir():
        cmd += ["--gts", str(SAMPLES / "gts")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _workspace_of(tag: str, dst: Path) -> Path:
    """Copy the image's /workspace (infer/, predict.sh, weights/) out of it into ``dst``."""
    cid = docker("create", tag).stdout.strip()
    try:
        docker("cp", f"{cid}:/workspace", str(dst))
    finally:
        docker("rm", cid, check=False)
    return dst


def test_docker_mode_scores_equal_the_run_without_docker(image, tmp_path):
    rows = _evaluate(tmp_path, "docker", "--docker", image["tag"], "--no-gpus")
    # The same model without Docker: the image's own infer/, predict.sh and weights, run by this
    # machine's Python (so a concurrent edit of the working tree cannot make the two differ).
    ws = _workspace_of(image["tag"], tmp_path / "workspace")
    cold = _evaluate(tmp_path, "cold", "--predict-sh", str(ws / "predict.sh"),
                     "--weights", str(ws / "weights"), "--device", "cpu")
    cases = sorted(p.name for p in SAMPLES.glob("*.npz"))
    assert [r["CaseName"] for r in rows] == [r["CaseName"] for r in cold] == cases
    for r, c in zip(rows, cold):
        assert r["MissingOutputs"] == "0", r["Notes"]
        for k in range(1, 7):
            assert r[f"DSC_{k}"] == c[f"DSC_{k}"] and r[f"NSD_{k}"] == c[f"NSD_{k}"], (r["CaseName"], k)
    times = [float(r[f"RunningTime_{k}"]) for r in rows for k in range(1, 7) if float(r[f"RunningTime_{k}"]) > 0]
    cold_times = [float(c[f"RunningTime_{k}"]) for c in cold for k in range(1, 7) if float(c[f"RunningTime_{k}"]) > 0]
    report(f"evaluation --docker on {len(cases)} case(s), {len(times)} container runs: per stage "
           f"mean {statistics.mean(times):.1f} s (min {min(times):.1f}, max {max(times):.1f}); "
           f"same stages without Docker mean {statistics.mean(cold_times):.1f} s; scores identical")
    for r in rows:
        report(f"  {r['CaseName']}: K={r['num_class']} DSC_Final {float(r['DSC_Final']):.4f} "
               f"total {float(r['TotalRunningTime']):.1f} s of {float(r['runtime_upperbound']):.0f} s")


def _wall(cmd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def test_cold_start_timings_on_cpu(image, tmp_path):
    tag = image["tag"]
    import_torch = statistics.median(
        _wall(["docker", "run", "--rm", tag, "python", "-c", "import torch"]) for _ in range(3))
    hello = statistics.median(
        _wall(["docker", "run", "--rm", tag, "python", "-c", "print('hello')"]) for _ in range(3))
    case = sorted(SAMPLES.glob("*.npz"))[0]
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    outputs.mkdir()
    shutil.copy(case, inputs / case.name)
    cmd = docker_command(tag, inputs, outputs, gpus=False)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_line = proc.stdout.readline()
    t_first = time.perf_counter() - t0
    rest = proc.stdout.read()
    proc.wait()
    t_stage = time.perf_counter() - t0
    assert proc.returncode == 0, first_line + rest
    _check_output(outputs / case.name, case)
    report(f'docker run python -c "import torch": {import_torch:.2f} s (median of 3); '
           f'python -c "print": {hello:.2f} s')
    report(f"box stage of {case.name}: first line of Python output after {t_first:.2f} s "
           f"({t_first / import_torch:.2f}x import torch) [{first_line.strip()}]; whole stage "
           f"{t_stage:.2f} s ({t_stage / import_torch:.2f}x import torch)")
