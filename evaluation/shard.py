"""Sharded evaluation: several worker processes, each scoring its own share of the cases.

``python -m evaluation ... --workers N`` starts N processes ``python -m evaluation ... --shard I/N``
(I = 0..N-1), waits for them and merges their results into the one ``metrics.csv`` /
``report.png`` / summary line a single worker writes. Worker I takes cases I, I + N, I + 2N, ...
of the sorted case list (round robin: neighbours in name order, often of similar size, land on
different workers) and writes ``OUT/shards/shard-I-of-N.json`` (every ``CaseResult`` field the
report uses, floats exact) and ``OUT/shards/shard-I-of-N.csv`` (its own rows). The merge puts the
rows back in case-name order, so the merged CSV has the rows, order and values of a single-worker
run; only the timing columns (and ``OverBudget``, which follows from them) can differ. On several
machines, run ``--shard I/N`` on each with the same ``--out`` (or copy the ``shards/`` folders
together) and then ``--merge-shards N``.

Devices: when GPUs are visible (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``) and the device is
not ``cpu``, worker I gets GPU ``I mod #GPUs`` alone: ``CUDA_VISIBLE_DEVICES`` for the cold and
warm modes, ``--gpus device=<id>`` through ``--docker-gpu-device`` for the Docker mode. On CPU the
workers are plain processes; each gets ``OMP_NUM_THREADS = cores // N`` unless the variable is
already set.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .runner import REPO_ROOT, CaseResult
from infer.writer import atomic_write

DONE_MARK = "@@evaluation-case-done "  # a worker's stdout line: one case finished
_SKIP = ("clicks", "segs")  # CaseResult fields the report does not use


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes I/N (e.g. 0/4), not {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= I < N")
    return i, n


def shard_cases(cases: Sequence, i: int, n: int) -> list:
    """Worker ``i`` of ``n``'s share of ``cases``: items i, i + n, i + 2n, ..."""
    return list(cases[i::n])


def shard_file(out, i: int, n: int, suffix: str = ".json") -> Path:
    return Path(out) / "shards" / f"shard-{i}-of-{n}{suffix}"


def result_to_dict(r: CaseResult) -> dict:
    return {f.name: getattr(r, f.name) for f in fields(CaseResult) if f.name not in _SKIP}


def result_from_dict(d: dict) -> CaseResult:
    return CaseResult(**d)


def write_shard(out, i: int, n: int, mode: str, cases: Sequence[str], results: List[CaseResult]) -> Path:
    """``OUT/shards/shard-I-of-N.json``, written atomically (a file that exists is complete)."""
    path = shard_file(out, i, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"shard": i, "of": n, "mode": mode, "cases": list(cases),
                            "results": [result_to_dict(r) for r in results]}))
    return path


def merge_shards(out, n: int) -> tuple[List[CaseResult], str, List[int]]:
    """(results of every shard file of ``n`` present, in case-name order; the mode; the shard
    numbers whose file is missing)."""
    results, modes, missing = [], set(), []
    for i in range(n):
        path = shard_file(out, i, n)
        if not path.is_file():
            missing.append(i)
            continue
        data = json.loads(path.read_text())
        modes.add(data["mode"])
        results += [result_from_dict(d) for d in data["results"]]
    names = [r.name for r in results]
    if len(set(names)) != len(names):
        raise ValueError(f"{out}/shards: a case appears in more than one shard")
    return sorted(results, key=lambda r: r.name), "+".join(sorted(modes)), missing


def visible_gpus(device: Optional[str]) -> List[str]:
    """The GPUs workers may be given: none for ``--device cpu``; else the entries of
    ``CUDA_VISIBLE_DEVICES`` when it is set, else the indices ``nvidia-smi -L`` lists."""
    if device == "cpu":
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [v.strip() for v in env.split(",") if v.strip() and v.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("GPU ")] if out.returncode == 0 else []
    return [str(k) for k in range(len(lines))]


def worker_env(i: int, n: int, gpus: Sequence[str], mode: str, base: Optional[dict] = None) -> dict:
    """The environment of worker ``i`` of ``n``: its own GPU (cold / warm modes) or, without
    GPUs, its share of the CPU threads; the repository importable."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if gpus and mode != "docker":
        env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
    elif not gpus:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    return env


def worker_args(argv: Sequence[str], i: int, n: int, gpus: Sequence[str], mode: str,
                docker_tag: Optional[str] = None, docker_gpus: Optional[bool] = None) -> List[str]:
    """The command line of worker ``i``: the parent's arguments, then overrides (argparse keeps
    the last value of an option): one worker, its shard, no progress bar, and in Docker mode the
    image tag the parent loaded and this worker's GPU."""
    cmd = [sys.executable, "-m", "evaluation", *argv, "--workers", "1", "--shard", f"{i}/{n}"]
    if mode == "docker":
        cmd += ["--docker", docker_tag, "--gpus" if docker_gpus else "--no-gpus"]
        if docker_gpus and gpus:
            cmd += ["--docker-gpu-device", gpus[i % len(gpus)]]
    return cmd


def run_workers(commands: List[List[str]], envs: List[dict], on_done: Callable[[int, str], None],
                log: Callable[[str], None]) -> List[int]:
    """Run the worker commands at once; ``on_done(worker, case)`` for each finished case, other
    stdout lines go to ``log`` prefixed with the worker number (stderr passes through).
    Returns the exit codes."""
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
             for cmd, env in zip(commands, envs)]
    lock = threading.Lock()

    def pump(k, proc):
        for line in proc.stdout:
            line = line.rstrip("\n")
            with lock:
                if line.startswith(DONE_MARK):
                    on_done(k, line[len(DONE_MARK):])
                elif line:
                    log(f"[worker {k}] {line}")

    threads = [threading.Thread(target=pump, args=(k, p), daemon=True) for k, p in enumerate(procs)]
    for t in threads:
        t.start()
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    for t in threads:
        t.join()
    return codes
