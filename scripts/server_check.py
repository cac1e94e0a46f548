"""Will the image's torch build run on the evaluation server? Checked without a GPU.

The evaluation server is a Quadro RTX 5000 (Turing, compute capability 7.5, 16 GB) with an
NVIDIA driver for CUDA 12.1. A small probe (standard library + torch, passed as ``python -c``
so that it runs in the image, which holds ``infer/`` but not ``scripts/``) reports the torch
build; this script decides:

1. **architectures**: the build carries GPU code (SASS) for every compute capability in
   ``PROMISED``: 7.5 (the evaluation server) and 9.0 (H100-class, where docs/GPU_CHECK.md was
   measured). SASS built for X.y also runs on X.z with z >= y (same major); PTX (``compute_XY``)
   counts only where the driver can JIT-compile it (below).
2. **CUDA runtime**: ``torch.version.cuda`` of the driver's major version (12). A 12.x newer
   than the driver's 12.1 runs through CUDA minor-version compatibility (Linux driver >=
   525.60.13 for 12.x; a 12.1 driver is 530 or later), with one consequence: the driver cannot
   JIT-compile PTX made by the newer toolkit, so only SASS counts (the architectures must be
   compiled in, not left to PTX). A CUDA 13 build does not run on it at all (the predictor
   would fall back to the CPU).
3. **no bfloat16 on the GPU path**: Turing has no bfloat16 tensor cores; no ``bfloat16`` /
   ``bf16`` in the ``infer/`` package the probe imports (the image's own ``/workspace/infer``
   with ``--image``), and every ``autocast`` there names ``float16``.

``torch.cuda.get_arch_list()`` returns ``[]`` when no GPU is visible; the probe calls
``torch._C._cuda_getArchFlags()``, the build's compile-time list, which answers without a GPU
(and does not exist in a CPU-only build). Exit status: 0 every check passed, 1 a check failed,
2 the probe could not run.

  .venv/bin/python -m scripts.server_check --image myteam:latest   # the built image (Docker, no GPU needed)
  .venv/bin/python -m scripts.server_check --python /path/to/python  # another interpreter, this repository's infer/
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from scripts.gpu_check import MIN_DRIVER, parse_version

ROOT = Path(__file__).resolve().parents[1]
SERVER = "Quadro RTX 5000 (Turing, compute capability 7.5, 16 GB), driver for CUDA 12.1"
DRIVER_CUDA = "12.1"
# compute capabilities (major * 10 + minor) the image must carry kernels for, and why
PROMISED = {75: "evaluation server: Quadro RTX 5000 (Turing)", 90: "H100-class (H100 / H200), docs/GPU_CHECK.md"}
TAG = "SERVER_CHECK "

# Runs as `python -c PROBE` with the interpreter under test: standard library and torch only.
PROBE = r'''
import json, os, sys
import torch
flags = getattr(torch._C, "_cuda_getArchFlags", None)
out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
       "arch_flags": flags() if flags is not None else None,
       "get_arch_list": torch.cuda.get_arch_list(), "infer_dir": None, "infer_files": {}}
try:
    import infer
    root = os.path.dirname(os.path.abspath(infer.__file__))
    out["infer_dir"] = root
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), encoding="utf-8") as f:
                out["infer_files"][name] = f.read()
except Exception as exc:
    out["infer_error"] = "%s: %s" % (type(exc).__name__, exc)
print("SERVER_CHECK " + json.dumps(out))
'''


@dataclass
class Check:
    name: str
    ok: bool
    value: str
    note: str = ""


def cc_text(cc: int) -> str:
    """75 -> '7.5', 120 -> '12.0'."""
    return f"{cc // 10}.{cc % 10}"


def parse_arch_flags(text: Optional[str]) -> Tuple[List[int], List[int]]:
    """``torch._C._cuda_getArchFlags()`` text -> (SASS capabilities, PTX capabilities), e.g.
    "sm_75 sm_90a compute_120" -> ([75, 90], [120]); None or "" -> ([], [])."""
    sass, ptx = [], []
    for kind, num in re.findall(r"\b(sm|compute)_(\d+)[a-z]?\b", text or ""):
        (sass if kind == "sm" else ptx).append(int(num))
    return sorted(set(sass)), sorted(set(ptx))


def sass_for(cc: int, sass: Sequence[int]) -> Optional[int]:
    """The SASS architecture that runs on capability ``cc``: same major, minor <= cc's (the
    newest such), else None."""
    fits = [s for s in sass if s // 10 == cc // 10 and s <= cc]
    return max(fits) if fits else None


def ptx_for(cc: int, ptx: Sequence[int]) -> Optional[int]:
    """The PTX that the driver could JIT-compile for ``cc``: any ``compute_XY`` with XY <= cc."""
    fits = [p for p in ptx if p <= cc]
    return max(fits) if fits else None


def check_cuda(runtime: Optional[str], driver_cuda: str = DRIVER_CUDA) -> Tuple[Check, bool]:
    """Whether a torch built with CUDA ``runtime`` runs on a driver for ``driver_cuda``, and
    whether that driver can JIT-compile the build's PTX (only when the build's CUDA is not newer
    than the driver's)."""
    rt, drv = parse_version(runtime), parse_version(driver_cuda)
    name = f"CUDA runtime runs on a CUDA {driver_cuda} driver"
    if not rt:
        return Check(name, False, "none", "a CPU-only torch build: the predictor would run on the CPU"), False
    value = f"CUDA {runtime}"
    if rt[0] > drv[0]:
        return Check(name, False, value, f"needs a driver for CUDA {rt[0]} (>= {MIN_DRIVER.get(rt[0], '?')})"), False
    if rt[0] < drv[0] or rt[:2] <= drv[:2]:
        return Check(name, True, value, "native (the driver is as new as the build)"), True
    return Check(name, True, value, f"through CUDA {rt[0]} minor-version compatibility (Linux driver >= "
                 f"{MIN_DRIVER[rt[0]]}): no PTX JIT for this build, only its SASS runs"), False


def check_arches(arch_flags: Optional[str], promised: Dict[int, str] = PROMISED,
                 ptx_jit: bool = False) -> List[Check]:
    """One check per promised capability: SASS that runs on it, or (``ptx_jit``) PTX the driver
    can compile for it."""
    sass, ptx = parse_arch_flags(arch_flags)
    out = []
    for cc, why in sorted(promised.items()):
        name = f"kernels for compute capability {cc_text(cc)} ({why})"
        s, p = sass_for(cc, sass), ptx_for(cc, ptx)
        if arch_flags is None:
            out.append(Check(name, False, "no CUDA arch list", "a CPU-only torch build"))
        elif s is not None:
            out.append(Check(name, True, f"sm_{s}", "" if s == cc else f"sm_{s} SASS runs on {cc_text(cc)}"))
        elif p is not None and ptx_jit:
            out.append(Check(name, True, f"compute_{p}", "PTX, JIT-compiled by the driver at first use"))
        else:
            note = (f"only PTX compute_{p}, which this driver cannot JIT-compile" if p is not None
                    else f"not in {arch_flags.strip() or 'an empty list'}")
            out.append(Check(name, False, "missing", note))
    return out


BF16 = re.compile(r"bfloat16|bf16", re.IGNORECASE)
AUTOCAST = re.compile(r"autocast\s*\(")


def check_bf16(files: Dict[str, str]) -> Check:
    """No ``bfloat16`` / ``bf16`` in ``files`` (name -> source) and every line that calls
    ``autocast(`` names ``float16``."""
    name = "no bfloat16 on the GPU path (infer/)"
    if not files:
        return Check(name, False, "no infer/ files", "the probe found no infer package")
    bad = []
    for fname, text in sorted(files.items()):
        for i, line in enumerate(text.splitlines(), 1):
            if BF16.search(line):
                bad.append(f"{fname}:{i}: {line.strip()[:60]}")
            elif AUTOCAST.search(line) and "float16" not in line:
                bad.append(f"{fname}:{i}: autocast without float16: {line.strip()[:60]}")
    if bad:
        return Check(name, False, f"{len(bad)} line(s)", "; ".join(bad[:3]))
    autocasts = sum(len(AUTOCAST.findall(t)) for t in files.values())
    return Check(name, True, "none", f"{len(files)} files; {autocasts} autocast call(s), all float16")


def decide(probe: dict, driver_cuda: str = DRIVER_CUDA, promised: Dict[int, str] = PROMISED) -> List[Check]:
    """Every check for one probe result (the dict ``PROBE`` prints)."""
    cuda, ptx_jit = check_cuda(probe.get("cuda"), driver_cuda)
    return [cuda] + check_arches(probe.get("arch_flags"), promised, ptx_jit) + [check_bf16(probe.get("infer_files") or {})]


def parse_probe_output(text: str) -> dict:
    """The JSON of the probe's ``SERVER_CHECK`` line; ValueError when there is none."""
    for line in text.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    raise ValueError("no SERVER_CHECK line in the probe's output")


def probe_command(image: Optional[str], python: Optional[str]) -> List[str]:
    """The command that runs ``PROBE``: in the image (``docker container run --rm --network none
    IMAGE python -c PROBE``, its working directory /workspace holding infer/) or with an
    interpreter, from this repository's root."""
    if image:
        return ["docker", "container", "run", "--rm", "--network", "none", image, "python", "-c", PROBE]
    return [python or sys.executable, "-c", PROBE]


def format_report(probe: dict, checks: List[Check]) -> str:
    lines = [f"server_check: {SERVER}",
             f"torch {probe.get('torch')}, CUDA {probe.get('cuda')}, Python {probe.get('python')}, "
             f"infer/ at {probe.get('infer_dir')}",
             f"arch flags (torch._C._cuda_getArchFlags): {probe.get('arch_flags')}; "
             f"torch.cuda.get_arch_list(): {probe.get('get_arch_list')}"]
    for c in checks:
        lines.append(f"{'ok    ' if c.ok else 'FAILED'} {c.name}: {c.value}" + (f" ({c.note})" if c.note else ""))
    ok = all(c.ok for c in checks)
    lines.append(f"result: {'pass' if ok else 'fail'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.server_check",
                                description=__doc__.split("\n\n")[0] + f" Server: {SERVER}.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit status: 0 pass, 1 a check failed, 2 the probe could not run.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--image", help="a built submission image (name:tag): the probe runs in it with Docker")
    where.add_argument("--python", help="interpreter to probe (default: this one), with this repository's infer/")
    p.add_argument("--driver-cuda", default=DRIVER_CUDA, help="the CUDA version of the server's driver "
                   "(default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the probe's result and the checks as JSON")
    args = p.parse_args(argv)
    cmd = probe_command(args.image, args.python)
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"server_check: the probe did not run ({cmd[0]}): {exc}", file=sys.stderr)
        return 2
    try:
        probe = parse_probe_output(r.stdout)
    except ValueError:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit status {r.returncode}"]
        print(f"server_check: the probe did not run ({cmd[0]}): {last[0]}", file=sys.stderr)
        return 2
    checks = decide(probe, args.driver_cuda)
    if args.json:
        print(json.dumps({"probe": {k: v for k, v in probe.items() if k != "infer_files"},
                          "checks": [c.__dict__ for c in checks]}, indent=1))
    else:
        print(format_report(probe, checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
