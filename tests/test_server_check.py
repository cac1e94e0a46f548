"""scripts/server_check.py: the decisions on made-up torch builds, and the probe on this interpreter."""
import json
import subprocess
import sys
from pathlib import Path

from scripts.server_check import (PROBE, check_arches, check_bf16, check_cuda, decide, parse_arch_flags,
                                  parse_probe_output, probe_command)

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = {75: "server"}


def oks(checks):
    return [c.ok for c in checks]


def test_arch_flags_are_split_into_sass_and_ptx():
    assert parse_arch_flags("sm_50 sm_60 sm_70 sm_75 sm_80 sm_86 sm_90 compute_90") == (
        [50, 60, 70, 75, 80, 86, 90], [90])
    assert parse_arch_flags("sm_90a sm_100 sm_120 compute_120") == ([90, 100, 120], [120])
    assert parse_arch_flags("") == ([], []) and parse_arch_flags(None) == ([], [])


def test_turing_needs_sass_of_its_own_major_not_newer():
    # sm_75 itself, or sm_70 (SASS for 7.0 runs on 7.5); sm_80 / sm_86 do not run on 7.5
    assert oks(check_arches("sm_75 sm_80 sm_90", {75: "s", 90: "h"})) == [True, True]
    (c,) = check_arches("sm_70 sm_80", SERVER_ONLY)
    assert c.ok and c.value == "sm_70"
    (c,) = check_arches("sm_80 sm_86 sm_90 sm_100 sm_120 compute_120", SERVER_ONLY)
    assert not c.ok and c.value == "missing"
    (c,) = check_arches("sm_60 sm_61", SERVER_ONLY)  # Pascal only
    assert not c.ok
    # a promised Hopper without sm_90 fails even when Turing is there
    assert oks(check_arches("sm_75 sm_80 sm_86", {75: "s", 90: "h"})) == [True, False]


def test_ptx_counts_only_when_the_driver_can_jit_it():
    flags = "sm_80 sm_90 compute_70"
    (c,) = check_arches(flags, SERVER_ONLY, ptx_jit=True)
    assert c.ok and c.value == "compute_70"
    (c,) = check_arches(flags, SERVER_ONLY, ptx_jit=False)
    assert not c.ok and "cannot JIT" in c.note
    (c,) = check_arches("sm_80 compute_80", SERVER_ONLY, ptx_jit=True)  # PTX for 8.0 does not run on 7.5
    assert not c.ok
    (c,) = check_arches(None, SERVER_ONLY)  # a CPU-only build has no list
    assert not c.ok and "CPU" in c.note


def test_cuda_runtime_against_a_12_1_driver():
    c, jit = check_cuda("12.8", "12.1")
    assert c.ok and not jit and "minor-version" in c.note and "525.60.13" in c.note
    c, jit = check_cuda("12.1", "12.1")
    assert c.ok and jit
    c, jit = check_cuda("12.0", "12.1")
    assert c.ok and jit
    c, jit = check_cuda("11.8", "12.1")  # an older major runs on a newer driver
    assert c.ok and jit
    c, jit = check_cuda("13.0", "12.1")
    assert not c.ok and not jit and "580.65.06" in c.note
    c, jit = check_cuda(None, "12.1")
    assert not c.ok


def test_bfloat16_and_autocast_dtype_are_found_line_by_line():
    clean = {"a.py": "with torch.autocast('cuda', dtype=torch.float16):\n    y = net(x)\n"}
    assert check_bf16(clean).ok
    c = check_bf16({"a.py": "x = 1\ny = x.to(torch.bfloat16)\n", "b.py": "ok = 1\n"})
    assert not c.ok and c.value == "1 line(s)" and "a.py:2" in c.note
    c = check_bf16({"p.py": "with torch.autocast('cuda'):\n"})
    assert not c.ok and "p.py:1: autocast without float16" in c.note
    assert not check_bf16({"q.py": "use_bf16 = True\n"}).ok  # a name with bf16 in it
    assert not check_bf16({"q.py": "dtype = 'BF16'\n"}).ok
    assert not check_bf16({}).ok  # nothing scanned is not a pass


def test_the_repository_infer_package_has_no_bfloat16():
    files = {p.name: p.read_text() for p in (ROOT / "infer").glob("*.py")}
    assert "predictor.py" in files
    assert check_bf16(files).ok


def test_decide_on_made_up_builds():
    image_like = {"cuda": "12.8", "arch_flags": "sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120 compute_120",
                  "infer_files": {"a.py": "x = 1\n"}}
    assert all(c.ok for c in decide(image_like))
    assert not all(c.ok for c in decide({**image_like, "cuda": "13.0"}))
    assert not all(c.ok for c in decide({**image_like, "arch_flags": "sm_80 sm_90 compute_90"}))


def test_probe_runs_with_this_interpreter_and_reports_the_build():
    """On this (CPU-only or CUDA) host: the probe answers, and what it reports is this torch."""
    import torch
    r = subprocess.run(probe_command(None, sys.executable), cwd=ROOT, capture_output=True, text=True, timeout=300)
    probe = parse_probe_output(r.stdout)
    assert probe["torch"] == torch.__version__ and probe["cuda"] == torch.version.cuda
    flags = getattr(torch._C, "_cuda_getArchFlags", None)
    assert probe["arch_flags"] == (flags() if flags else None)
    assert probe["infer_dir"] == str(ROOT / "infer") and "predictor.py" in probe["infer_files"]
    assert json.loads(json.dumps(probe)) == probe


def test_image_command_runs_the_probe_with_the_images_python():
    cmd = probe_command("team:latest", None)
    assert cmd[:6] == ["docker", "container", "run", "--rm", "--network", "none"]
    assert cmd[6:] == ["team:latest", "python", "-c", PROBE]
