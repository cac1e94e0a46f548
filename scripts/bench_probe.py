"""One cold stage, timed step by step from the outside: run by ``scripts/bench.py`` in a fresh
interpreter (``python -m scripts.bench_probe CONFIG_JSON``), never imported by the predictor.

It does what ``python -m infer`` does for one case, through the public API only:
``import infer.__main__`` (which sets up the environment torch reads when loaded), ``import
torch``, the rest of ``infer``, ``Predictor.from_path``, ``read_case``, ``Predictor.predict``,
``write_segs``; then predicts the same case ``warm`` more times in the same process. Network
passes are timed with forward hooks on ``Predictor.network`` (torch's public hook API); everything
else in ``predict`` (normalisation, crops, prompt channels, resampling, merge, label map to host)
is ``predict`` minus the network time. On CUDA every timed step is synchronised.

CONFIG_JSON: {"case", "weights", "device", "warm", "output"}. Prints one line
``INFER_BENCH <json>`` with the figures (seconds) that ``scripts/bench.py`` tabulates.
Standard library only at import time, so that ``import torch`` is timed by itself.
"""
import time

T_START = time.time()

import json  # noqa: E402 - after the clock: interpreter start is measured to here
import sys  # noqa: E402

MARK = "INFER_BENCH "


def main(cfg: dict) -> dict:
    out = {"t_start": T_START}
    clock = time.perf_counter
    t = clock()
    import infer.__main__  # noqa: F401 - python -m infer's own first step
    t_main = clock() - t
    t = clock()
    import torch
    out["import_torch"] = clock() - t
    t = clock()
    from infer.npz import read_case
    from infer.writer import write_segs
    from infer.predictor import Predictor
    from infer.case import num_classes
    out["import_infer"] = clock() - t + t_main

    dev = torch.device(cfg["device"])

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t = clock()
    pred = Predictor.from_path(cfg["weights"], device=cfg["device"])
    sync()
    out["weights"] = clock() - t
    out["threads"] = [torch.get_num_threads(), torch.get_num_interop_threads()]

    passes = []  # seconds of each network forward pass in the current run
    started = []

    def before(module, args):
        sync()
        started.append(clock())

    def after(module, args, result):
        sync()
        passes.append(clock() - started.pop())

    pred.network.register_forward_pre_hook(before)
    pred.network.register_forward_hook(after)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    runs = []
    segs = None
    for run in range(1 + int(cfg["warm"])):
        passes.clear()
        t = clock()
        case = read_case(cfg["case"])
        t_read = clock() - t
        sync()
        t = clock()
        segs = pred.predict(case)
        sync()
        r = {"npz_read": t_read, "predict": clock() - t, "k": num_classes(case),
             "net": sum(passes), "calls": len(passes)}
        if run == 0:
            t = clock()
            write_segs(cfg["output"], segs)
            r["write"] = clock() - t
            out["t_written"] = time.time()
        runs.append(r)
    out["runs"] = runs
    out["peak_mem"] = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    out["labels"] = int(segs.max())
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        # no argparse: only json and sys are imported before the timed steps
        ok = sys.argv[1:] in (["-h"], ["--help"])
        print("usage: python -m scripts.bench_probe CONFIG_JSON\n\n" + __doc__.strip(),
              file=sys.stdout if ok else sys.stderr)
        sys.exit(0 if ok else 2)
    print(MARK + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
