"""``python -m scripts.train_bench``: what a fine-tuning step costs, data side and network side
(a benchmark, not a test).

    python -m scripts.train_bench [--config demo|v1.0] [--device cpu|cuda] [--cases 4]
        [--shape D,H,W] [--batch-size 2] [--data-examples 16] [--steps 5] [--loop-steps 6]
        [--workers 1] [--epoch-examples 500] [--data-only] [--force] [--json PATH]

Configurations: ``demo`` is the bundled demo model (``weights/demo``: its card's architecture,
patch and prompt settings, its weights); ``v1.0`` is nnInteractive v1.0's ResEnc-L (102 M
parameters, patch 192^3, 8 input channels, 2 outputs) with random weights (the last layer biased
to background, so every no-grad prediction takes exactly one forward pass and is empty).

It makes ``--cases`` synthetic training cases in memory (``scripts.synthetic.generate_case`` at
``--shape``), writes them to a temporary folder as compressed npz files, and indexes them as
``python -m train --workers N`` does (``train.data.index_folder``), so that case loading is the
real one. Everything else is ``train/``'s own code, through a ``train.loop.Trainer`` with the
recipe's defaults:

1. Data side, per loader worker: ``train.loader.ExampleSet.__getitem__`` (what one DataLoader
   worker runs: case loading, normalisation, box or click, crops, prompt channels, target) for
   ``--data-examples`` slots, in this process with one torch thread (a worker's setting);
   examples/s per worker. Slots that need the no-grad second interaction come back deferred;
   the main process finishes them (``train.loader.finish_batch``: one no-grad prediction through
   the trainer's engine, the organizer's click, the final input), timed apart per deferred example.
2. The training step: ``Trainer.train_step`` (forward, 10 x Dice + CE, backward, AdamW; fp16
   autocast on CUDA) on one batch, ``--steps`` times after one warm-up step; median and mean.
3. The loop: ``--loop-steps`` steps of ``Trainer.loader_batches`` (the DataLoader with
   ``--workers`` worker processes, plus the main-process finishing) and ``Trainer.train_step``,
   timing the wait for each batch and the step apart. The first step (worker start-up) is
   reported on its own and left out of the means. Wait share = wait / (wait + step).
4. Peak memory: the process's peak resident memory on CPU (``ru_maxrss``, the main process only,
   the cases included); ``torch.cuda.max_memory_allocated`` over the training phases on CUDA.
5. Projection: an epoch of ``--epoch-examples`` examples takes ``ceil(N / global batch)`` steps
   of ``wait + step`` seconds (the loop's means). And the data side's limit: with ``c`` cores,
   ``c - 1`` workers (one core for the main process) supply ``(c - 1) x rate`` examples/s, so
   a step of batch ``b`` is not starved as long as it takes at least ``b / ((c - 1) x rate)`` s.
   ``rate`` here is examples per CPU second of the worker (what a dedicated core delivers; on a
   busy machine the wall-time rate, also reported, counts the waits for a core as well).

``--data-only``: phase 1 only, without the network (no deferred examples finished), as the data
side of a GPU run (deferred examples go to the main process unnormalised) unless ``--device cpu``;
allowed for ``v1.0`` on a CPU, which otherwise needs ``--force`` (a 192^3 training step on a CPU
takes minutes). With more than one GPU (``--torchrun``, default: when CUDA sees several), a short
``torchrun --standalone -m train`` run on all of them is timed as well; that code path has not
been run on a multi-GPU machine yet.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # also as ``python scripts/train_bench.py``
    sys.path.insert(0, str(REPO))

DEMO_WEIGHTS = REPO / "weights" / "demo"
DEFAULT_SHAPE = {"demo": (64, 96, 96), "v1.0": (192, 256, 256)}
CONFIGS = ("demo", "v1.0")
CORE_COUNTS = (8, 16)  # typical GPU hosts, for the data-side projection


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.train_bench",
                                description=__doc__.splitlines()[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Details in the module docstring and docs/TRAINING.md.")
    p.add_argument("--config", choices=CONFIGS, default="demo",
                   help="demo (weights/demo) or v1.0 (ResEnc-L 192^3, random weights); default demo")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--weights", default=None,
                   help="an artifact or release folder to use instead (its card decides the patch)")
    p.add_argument("--cases", type=int, default=4, help="synthetic training cases (default 4)")
    p.add_argument("--shape", default=None,
                   help="D,H,W of each case (default: 64,96,96 for demo, 192,256,256 for v1.0)")
    p.add_argument("--batch-size", type=int, default=2, help="examples per step (default 2)")
    p.add_argument("--data-examples", type=int, default=16,
                   help="example slots timed on the data side (default 16)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps on one batch (default 5)")
    p.add_argument("--loop-steps", type=int, default=6,
                   help="steps of the loader + training loop, the first one not counted (default 6)")
    p.add_argument("--workers", type=int, default=1, help="loader workers in the loop (default 1)")
    p.add_argument("--epoch-examples", type=int, default=500,
                   help="examples per epoch for the projection (default 500)")
    p.add_argument("--p-second", type=float, default=0.5,
                   help="probability of the no-grad second interaction (default 0.5, the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cases and examples (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the main process (default: torch's choice)")
    p.add_argument("--data-only", action="store_true", help="the data side only (phase 1), no network")
    p.add_argument("--force", action="store_true", help="run v1.0 training steps on a CPU anyway")
    p.add_argument("--torchrun", choices=("auto", "on", "off"), default="auto",
                   help="time a short torchrun run, one process per GPU (auto: with more than one "
                        "GPU; on without a GPU: one process on the CPU)")
    p.add_argument("--profile", default=None,
                   help="write a cProfile of the data side (phase 1) to this file")
    p.add_argument("--json", default=None, help="write every figure to this JSON file")
    return p.parse_args(argv)


# ------------------------------------------------------------------ pure arithmetic
def epoch_projection(epoch_examples: int, global_batch: int, s_per_step: float) -> dict:
    """Steps and seconds of an epoch of ``epoch_examples`` examples (the last step may be partial:
    counted whole)."""
    steps = math.ceil(epoch_examples / global_batch)
    return {"examples": int(epoch_examples), "global_batch": int(global_batch), "steps": steps,
            "s_per_step": s_per_step, "projected_s": steps * s_per_step}


def data_limits(rate_per_worker: float, batch: int, cores=CORE_COUNTS) -> dict:
    """Per core count ``c``: the examples/s that ``c - 1`` workers supply and the shortest step of
    batch ``batch`` they keep fed (seconds)."""
    out = {}
    for c in cores:
        supply = (c - 1) * rate_per_worker
        out[str(c)] = {"workers": c - 1, "examples_per_s": supply,
                       "min_step_s": batch / supply if supply > 0 else math.inf}
    return out


def workers_needed(rate_per_worker: float, batch: int, step_s: float) -> float:
    """Workers that supply a batch of ``batch`` examples every ``step_s`` seconds."""
    return batch / (step_s * rate_per_worker)


# ------------------------------------------------------------------ set-up
def make_cases(folder: Path, n: int, shape, seed: int) -> float:
    """Write ``n`` synthetic training cases (``scripts.synthetic.generate_case``) to ``folder``
    as compressed npz files; returns the seconds it took."""
    import numpy as np
    from scripts.synthetic import generate_case
    t = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        case = generate_case(np.random.default_rng([seed, i]), shape=shape)
        np.savez_compressed(folder / f"bench_{i:03d}.npz", imgs=case["imgs"], gts=case["gts"],
                            spacing=case["spacing"])
    return time.perf_counter() - t


def build(config: str, weights, seed: int, need_network: bool):
    """-> (network on CPU, ModelCard, description of the weights)."""
    import torch
    from infer.card import DEFAULT_CHANNELS, ModelCard
    if weights is not None or config == "demo":
        from train.__main__ import build_model
        src = Path(weights) if weights is not None else DEMO_WEIGHTS
        net, card = build_model(str(src), "demo", seed, None, False, "scripts.train_bench")
        return net, card, str(src)
    from scripts.bench import FULL_ARCH, FULL_PATCH
    card = ModelCard(architecture=FULL_ARCH, input_channels=len(DEFAULT_CHANNELS), num_classes=2,
                     patch_size=list(FULL_PATCH), box_style="2d", click_radius=4, prompt_decay=0.9,
                     source="scripts.train_bench: random weights of the v1.0 configuration")
    if not need_network:
        return None, card, "none (data side only)"
    from scripts.gpu_check import random_network
    net = random_network(FULL_ARCH, "cpu", seed=seed, background_bias=True)
    return net.train().requires_grad_(True), card, "random (v1.0 configuration, background-biased)"


def data_only_trainer(cases, card, p_second: float, device):
    """The parts of a ``train.loop.Trainer`` the data side reads, without a network: its cases,
    its prompt simulation (the recipe's other settings at ``Trainer``'s defaults), a
    ``train.simulate.SimModel`` that only carries the card and the card's policy (the workers
    never run the network), and
    the training device the data side serves (``device``: on a GPU the workers leave the deferred
    examples' normalisation to the main process)."""
    import functools
    import inspect
    from types import SimpleNamespace

    import torch
    from train.loop import Trainer
    from train.simulate import SimModel, simulate_example
    d = {k: v.default for k, v in inspect.signature(Trainer.__init__).parameters.items()}
    simulate = functools.partial(simulate_example, p_box=d["p_box"], p_second=p_second,
                                 autozoom=d["sim_autozoom"], p_zoom_out=d["p_zoom_out"],
                                 p_refine=d["p_refine"])
    cpu = torch.device("cpu")
    return SimpleNamespace(cases=cases, simulate=simulate, device=torch.device(device),
                           sim=SimModel.of(None, card, cpu))


def count_parameters(net, card) -> int:
    """Parameters of ``net``, or (``net`` None) of ``card``'s architecture, built on the meta device."""
    if net is None:
        import torch
        from infer.network import build_network
        with torch.device("meta"):
            net = build_network(card.architecture, card.input_channels, card.num_classes)
    return sum(p.numel() for p in net.parameters())


def peak_memory(device) -> dict:
    import torch
    if device.type == "cuda":
        return {"kind": "cuda_max_memory_allocated", "peak_bytes": int(torch.cuda.max_memory_allocated(device))}
    # Linux reports ru_maxrss in KiB
    return {"kind": "cpu_peak_rss_main_process", "peak_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ phases
def handover(item) -> None:
    """What a DataLoader worker does with an item's tensors when it sends them to the main
    process: move them into shared memory (a copy)."""
    for name in ("x", "target", "image"):
        t = getattr(item, name)
        if t is not None:
            t.share_memory_()


def data_side(trainer, n_examples: int, seed: int, finish: bool, profile=None, keep_first: int = 0):
    """Phase 1: ``ExampleSet.__getitem__`` for slots 0..n-1 of epoch 0, one torch thread; then the
    main process's finishing of the deferred ones (``finish_batch``), timed apart. Returns the
    figures and the items (None for the finished ones after the first ``keep_first``)."""
    import torch
    from train.loader import ExampleSet, finish_batch
    examples = ExampleSet(trainer.cases, trainer.simulate, trainer.sim, seed, n_examples,
                          normalize=trainer.device.type == "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
    try:
        times, cpu, items, deferred_flags = [], [], [], []
        for j in range(n_examples):
            c = time.process_time()
            t = time.perf_counter()
            if prof is not None:
                prof.enable()
            it = examples[(0, j)]
            handover(it)
            if prof is not None:
                prof.disable()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            deferred_flags.append(it.x is None)
            # kept: the first batch (phase 2) and the deferred items (small: the case's arrays);
            # finished patches of other slots are let go, as a worker lets them go
            items.append(it if (j < keep_first or it.x is None) else None)
    finally:
        torch.set_num_threads(threads)
    if prof is not None:
        prof.dump_stats(profile)
    deferred = [it for it, d in zip(items, deferred_flags) if d]
    t_def = [t for t, d in zip(times, deferred_flags) if d]
    t_fin = [t for t, d in zip(times, deferred_flags) if not d]
    c_def = [c for c, d in zip(cpu, deferred_flags) if d]
    c_fin = [c for c, d in zip(cpu, deferred_flags) if not d]
    out = {"examples": n_examples, "torch_threads": 1, "serves": trainer.device.type,
           "worker_s_total": sum(times),
           "worker_s_per_example": sum(times) / n_examples,
           "examples_per_s_per_worker": n_examples / sum(times),
           "worker_cpu_s_total": sum(cpu),
           "examples_per_cpu_s": n_examples / sum(cpu),
           "worker_cpu_s_per_finished": statistics.fmean(c_fin) if c_fin else None,
           "worker_cpu_s_per_deferred": statistics.fmean(c_def) if c_def else None,
           "worker_s_per_finished": statistics.fmean(t_fin) if t_fin else None,
           "worker_s_per_deferred": statistics.fmean(t_def) if t_def else None,
           "deferred": len(deferred), "deferred_share": len(deferred) / n_examples,
           "finish_s_per_deferred": None}
    if finish and deferred:
        ft = []
        for it in deferred:
            _sync(trainer.device)
            t = time.perf_counter()
            finish_batch([it], trainer.simulate, trainer.sim, seed, trainer.device)
            _sync(trainer.device)
            ft.append(time.perf_counter() - t)
        out["finish_s_per_deferred"] = sum(ft) / len(ft)
    return out, items


def train_steps(trainer, items, batch: int, seed: int, steps: int) -> dict:
    """Phase 2: ``steps`` timed ``Trainer.train_step`` calls on one batch, after one warm-up."""
    from train.loader import finish_batch
    x, t = finish_batch(items[:batch], trainer.simulate, trainer.sim, seed, trainer.device)
    trainer.train_step(x, t)  # warm-up (allocator, cuDNN autotuning)
    _sync(trainer.device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(x, t)
        _sync(trainer.device)
        times.append(time.perf_counter() - t0)
    return {"batch": batch, "steps": steps, "amp_fp16": bool(trainer.amp),
            "step_s_median": statistics.median(times), "step_s_mean": statistics.fmean(times),
            "step_s_min": min(times), "step_s_max": max(times)}


def loop(trainer, steps: int, workers: int) -> dict:
    """Phase 3: ``steps`` steps of the real loader + ``train_step``; the first step apart."""
    waits, stepts = [], []
    batches = trainer.loader_batches(0)
    for _ in range(steps):
        t0 = time.perf_counter()
        x, t = next(batches)
        _sync(trainer.device)
        t1 = time.perf_counter()
        trainer.train_step(x, t)
        _sync(trainer.device)
        waits.append(t1 - t0)
        stepts.append(time.perf_counter() - t1)
    batches.close()
    w, s = waits[1:], stepts[1:]
    wait_mean, step_mean = statistics.fmean(w), statistics.fmean(s)
    return {"workers": workers, "steps": len(w), "first_wait_s": waits[0], "first_step_s": stepts[0],
            "wait_s_mean": wait_mean, "step_s_mean": step_mean,
            "s_per_step": wait_mean + step_mean, "wait_share": wait_mean / (wait_mean + step_mean)}


def torchrun_run(data: Path, weights: Path, out: Path, n_proc: int, steps: int, batch: int,
                 workers: int, device: str) -> dict:
    """A short ``torchrun --standalone -m train`` run of ``n_proc`` processes (one per GPU; one
    epoch of ``steps`` steps); wall time from launch to exit, start-up included."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_proc}",
           "-m", "train", "--data", str(data), "--init", str(weights), "--out", str(out),
           "--epochs", "1", "--steps-per-epoch", str(steps), "--batch-size", str(batch),
           "--workers", str(workers), "--device", device, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    return {"processes": n_proc, "steps": steps, "batch_per_process": batch,
            "global_batch": batch * n_proc, "workers_per_process": workers, "returncode": r.returncode, "wall_s": wall,
            "wall_s_per_step_incl_startup": wall / steps,
            "stderr_tail": r.stderr[-2000:] if r.returncode else ""}


# ------------------------------------------------------------------ report
def machine(device) -> dict:
    import torch
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "device": str(device)}
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def lines(rep: dict) -> list:
    mb = 1024 ** 2
    out = [f"machine: {rep['machine']['platform']}, {rep['machine']['cpu_count']} CPUs, "
           f"torch {rep['machine']['torch']}, device {rep['machine']['device']}"
           + (f" ({rep['machine']['gpu']})" if "gpu" in rep["machine"] else ""),
           f"configuration {rep['config']}: {rep['model']['parameters'] / 1e6:.2f} M parameters, "
           f"patch {rep['model']['patch']}, weights {rep['model']['weights']}",
           f"cases: {rep['cases']['n']} x {rep['cases']['shape']} (made in {rep['cases']['make_s']:.1f} s)"]
    d = rep["data"]
    out.append(f"data side, one worker (1 thread, serving a {d['serves']} run): "
               f"{d['examples_per_s_per_worker']:.2f} examples/s "
               f"({d['worker_s_per_example'] * 1e3:.0f} ms per example, {d['examples']} examples, "
               f"{d['deferred']} deferred to the main process); per CPU second: "
               f"{d['examples_per_cpu_s']:.2f} examples")
    for kind in ("finished", "deferred"):
        if d[f"worker_s_per_{kind}"] is not None:
            out.append(f"  worker time per {kind} example: {d[f'worker_s_per_{kind}'] * 1e3:.0f} ms "
                       f"({d[f'worker_cpu_s_per_{kind}'] * 1e3:.0f} ms CPU)")
    if d["finish_s_per_deferred"] is not None:
        out.append(f"main-process finishing per deferred example (no-grad prediction, click, input): "
                   f"{d['finish_s_per_deferred'] * 1e3:.0f} ms")
    if "step" in rep:
        s = rep["step"]
        out.append(f"training step, batch {s['batch']}{' fp16 autocast' if s['amp_fp16'] else ''}: "
                   f"median {s['step_s_median']:.3f} s, mean {s['step_s_mean']:.3f} s over {s['steps']}")
    if "loop" in rep:
        lp = rep["loop"]
        out.append(f"loop with {lp['workers']} worker(s), {lp['steps']} steps after the first: wait "
                   f"{lp['wait_s_mean']:.3f} s + step {lp['step_s_mean']:.3f} s per step, "
                   f"wait share {lp['wait_share']:.2f} (first step: wait {lp['first_wait_s']:.2f} s)")
        e = rep["epoch"]
        out.append(f"projected epoch of {e['examples']} examples: {e['steps']} steps x "
                   f"{e['s_per_step']:.3f} s = {e['projected_s']:.0f} s ({e['projected_s'] / 60:.1f} min)")
    m = rep["memory"]
    out.append(f"peak memory ({m['kind']}): {m['peak_bytes'] / mb:.0f} MiB")
    for c, lim in rep["data_limits"].items():
        out.append(f"data side with {c} dedicated cores ({lim['workers']} workers, at the CPU-time "
                   f"rate): {lim['examples_per_s']:.1f} "
                   f"examples/s, keeps a step of batch {rep['batch']} fed if it takes >= "
                   f"{lim['min_step_s'] * 1e3:.0f} ms")
    if rep.get("workers_needed") is not None:
        out.append(f"workers needed at the measured step time: {rep['workers_needed']:.1f}")
    if "torchrun" in rep:
        tr = rep["torchrun"]
        out.append(f"torchrun, {tr['processes']} process(es): {tr['steps']} steps in {tr['wall_s']:.1f} s "
                   f"(start-up included), rc {tr['returncode']}")
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    device = torch.device(a.device) if a.device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("train_bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if a.config == "v1.0" and device.type == "cpu" and not (a.force or a.data_only) and a.weights is None:
        print("train_bench: the v1.0 configuration (102 M parameters, 192^3 patch) needs a GPU: one "
              "training step on a CPU takes minutes. Use --data-only for its data side, or --force "
              "to run it on the CPU anyway.", file=sys.stderr)
        return 2
    if min(a.batch_size, a.data_examples, a.steps, a.cases) < 1 or a.loop_steps < 2:
        print("train_bench: counts must be >= 1 (--loop-steps >= 2)", file=sys.stderr)
        return 2
    if not a.data_only and a.data_examples < a.batch_size:
        print("train_bench: --data-examples must be >= --batch-size", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = tuple(int(v) for v in a.shape.split(",")) if a.shape else DEFAULT_SHAPE[a.config]

    from train.data import index_folder
    from train.loop import Trainer

    work = Path(tempfile.mkdtemp(prefix="train_bench_"))
    try:
        make_s = make_cases(work / "data", a.cases, shape, a.seed)
        refs = index_folder(work / "data")
        net, card, wdesc = build(a.config, a.weights, a.seed, need_network=not a.data_only)
        if a.data_only:  # what the workers need of a Trainer: cases, simulate, sim, device
            # the data side of a GPU run unless --device cpu says otherwise (no GPU is used)
            trainer = data_only_trainer(refs, card, a.p_second, a.device or "cuda")
        else:
            trainer = Trainer(net, card, refs, work / "run", epochs=1,
                              steps_per_epoch=a.loop_steps, batch_size=a.batch_size, seed=a.seed,
                              p_second=a.p_second, device=str(device), progress=False,
                              workers=a.workers)
        rep = {"config": a.config, "machine": machine(device), "batch": a.batch_size,
               "model": {"parameters": count_parameters(net, card),
                         "patch": list(card.patch_size), "weights": wdesc},
               "cases": {"n": len(refs), "shape": list(shape), "make_s": make_s},
               "p_second": a.p_second}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rep["data"], items = data_side(trainer, a.data_examples, a.seed, finish=not a.data_only,
                                       profile=a.profile,
                                       keep_first=0 if a.data_only else a.batch_size)
        if not a.data_only:
            rep["step"] = train_steps(trainer, items, a.batch_size, a.seed, a.steps)
            rep["loop"] = loop(trainer, a.loop_steps, a.workers)
            rep["epoch"] = epoch_projection(a.epoch_examples, a.batch_size, rep["loop"]["s_per_step"])
        rep["memory"] = peak_memory(device)
        # per dedicated core: the worker's CPU time (wall time on a busy machine counts the waits
        # for a core too); the wall-time rate is in rep["data"] beside it
        rate = rep["data"]["examples_per_cpu_s"]
        rep["data_limits"] = data_limits(rate, a.batch_size)
        rep["workers_needed"] = (workers_needed(rate, a.batch_size, rep["step"]["step_s_median"])
                                 if "step" in rep else None)
        n_gpu = torch.cuda.device_count() if device.type == "cuda" else 0
        if not a.data_only and (a.torchrun == "on" or (a.torchrun == "auto" and n_gpu > 1)):
            init = Path(a.weights) if a.weights else DEMO_WEIGHTS
            if a.weights is None and a.config == "v1.0":
                from infer.convert import write_artifact
                init = write_artifact(work / "init", trainer.network.state_dict(), card)
            rep["torchrun"] = torchrun_run(work / "data", init, work / "ddp", max(n_gpu, 1),
                                           a.loop_steps, a.batch_size, a.workers, device.type)
        trainer.loader = None
        for line in lines(rep):
            print(line)
        if a.json:
            Path(a.json).write_text(json.dumps(rep, indent=2) + "\n", encoding="utf-8")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
