"""``python -m train``: fine-tune (or train from scratch) with dynamic prompt generation.

    python -m train --data DIR --init WEIGHTS|scratch --out DIR [--epochs N] [--config tiny|demo]
                    [--steps-per-epoch N] [--batch-size 2] [--lr 1e-4] [--seed 0]
                    [--val DIR [--val-n 6] [--val-clicks 1] [--best-metric M]] [--keep 2]
                    [--device cpu|cuda] [--box-style 2d|3d] [--demo] [--workers N]
                    [--lr-scale none|sqrt|linear] [--quick]

    torchrun --nproc_per_node=N -m train ...     (DistributedDataParallel, one process per GPU)

``--data``: training npz files (``imgs``, ``gts``, ``spacing``: the organizer's training layout).
``--init``: an nnInteractive release folder or a converted artifact (``infer.weights``), or
``scratch`` for a fresh network of ``--config``. A run folder that already holds a checkpoint is
resumed from it (``--init`` is then ignored); ``OUT/final`` is the artifact to use with
``python -m infer --weights OUT/final``, ``OUT/best`` the epoch that validated best (with ``--val``).
Ctrl-C stops with one line naming the last checkpoint, exit status 130.

Under ``torchrun`` (see docs/SCALEOUT.md) ``--batch-size`` is per process: the global batch is
``batch_size x world_size``; rank 0 alone writes ``OUT`` and validates.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm import tqdm

from infer.card import DEFAULT_CHANNELS, ModelCard
from infer.network import build_network
from infer.weights import find_model_root, instantiate, read_artifact, read_release

from .checkpoint import BEST, latest_checkpoint
from .configs import CARD_DEFAULTS, CONFIGS, get_config
from .data import index_folder, load_folder
from .distributed import LR_RULES, scaled_lr, setup, teardown
from .loop import Trainer
from .validate import make_validator

# --quick: a first fine-tuning run in a few minutes on a CPU (docs/TRAINING.md, "A first run");
# flags given on the command line override these
QUICK = {"epochs": 3, "steps_per_epoch": 40, "val_n": 3, "val_clicks": 1, "no_sim_autozoom": True}
VAL_METRICS = ("val_final_dsc", "val_box_dsc", "val_final_dsc_box", "val_final_dsc_nobox",
               "val_click1_dsc_nobox", "val_dsc_auc")


def interrupted_message(out) -> str:
    """The one line ``python -m train`` ends with on Ctrl-C: where the last checkpoint is and how
    to go on from it."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return (f"python -m train: interrupted before the first checkpoint; nothing to resume in "
                f"{out}: the same command starts over")
    epoch = int(ckpt.name.split("_")[-1])
    return (f"python -m train: interrupted; last checkpoint {ckpt} (epoch {epoch}): run the same "
            f"command again to resume from it")


def build_model(init: str, config: str, seed: int, box_style: str | None, demo: bool, source: str):
    """-> (trainable network on CPU, ModelCard) from ``init`` ("scratch" or a weights path)."""
    if init == "scratch":
        cfg = get_config(config)
        torch.manual_seed(seed)
        net = build_network(cfg["architecture"], len(DEFAULT_CHANNELS), 2)
        card = ModelCard(architecture=cfg["architecture"], input_channels=len(DEFAULT_CHANNELS),
                         num_classes=2, patch_size=cfg["patch_size"],
                         box_style=box_style or CARD_DEFAULTS["box_style"],
                         click_radius=CARD_DEFAULTS["click_radius"],
                         prompt_decay=CARD_DEFAULTS["prompt_decay"], demo=demo, source=source)
        return net, card
    kind, root = find_model_root(init)
    sd, card = read_release(root) if kind == "release" else read_artifact(root)
    net = instantiate(card, sd, "cpu")
    card.box_style = box_style or card.box_style
    card.demo = demo or card.demo  # a model fine-tuned from a demo model stays one (build.sh)
    card.weights_sha256 = None
    card.source = f"{source}; initialised from {root}"
    card.validate()
    return net.train().requires_grad_(True), card


class _Help(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default, except where it is None or False (then the help text
    says what happens) or the text already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not hidden and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[0],
                                 epilog="Details: docs/TRAINING.md; several GPUs or nodes: docs/SCALEOUT.md.",
                                 formatter_class=_Help)
    ap.add_argument("--data", required=True, help="folder of training npz files (imgs, gts, spacing)")
    ap.add_argument("--init", required=True, help="weights folder (release or artifact) or 'scratch'")
    ap.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, final/")
    ap.add_argument("--epochs", type=int, default=10, help="passes of --steps-per-epoch steps; a "
                    "checkpoint is written after each")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="demo",
                    help="architecture and patch of a model trained from scratch")
    ap.add_argument("--steps-per-epoch", type=int, default=250, help="optimizer steps per epoch")
    ap.add_argument("--batch-size", type=int, default=2,
                    help="examples per process and step (global batch: x the torchrun world size)")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (before --lr-scale)")
    ap.add_argument("--lr-scale", choices=LR_RULES, default="none",
                    help="scale --lr with the global batch B relative to the recipe's 2: "
                         "sqrt (lr x sqrt(B/2)), linear (lr x B/2) or none")
    ap.add_argument("--workers", type=int, default=0,
                    help="data-loader worker processes per training process that read and "
                         "prepare cases (0: in the main process; see train/loader.py)")
    ap.add_argument("--dist-timeout", type=float, default=60.0,
                    help="torchrun: minutes a rank may wait for the others (rank 0 validates alone)")
    ap.add_argument("--lr-schedule", choices=("constant", "poly"), default="constant",
                    help="constant (the recipe) or nnU-Net's poly decay over --epochs")
    ap.add_argument("--weight-decay", type=float, default=3e-5, help="AdamW weight decay")
    ap.add_argument("--seed", type=int, default=0, help="seed of the network initialisation (scratch) "
                    "and of case, crop and prompt sampling")
    ap.add_argument("--p-box", type=float, default=0.5, help="probability that the first prompt is the box")
    ap.add_argument("--p-second", type=float, default=0.5,
                    help="probability of the second (simulated-click) step; 1.0 = always")
    ap.add_argument("--no-sim-autozoom", action="store_true",
                    help="second step: predict on the first crop only (cheaper on CPU)")
    ap.add_argument("--p-zoom-out", type=float, default=0.0,
                    help="probability of training on the crop the predictor's autozoom reaches")
    ap.add_argument("--p-refine", type=float, default=0.0,
                    help="probability of a full-resolution refinement example (coarse prediction "
                         "as previous mask, zoom-1 tile), taken from the draws without a second step")
    ap.add_argument("--policy", default=None,
                    help="interaction policy whose crops the examples are cut on (infer/policy.py "
                         "spec; default: the model card's, else project)")
    ap.add_argument("--val", help="validation-layout folder (images/, gts/) for the per-epoch warm evaluation")
    ap.add_argument("--val-n", type=int, default=6,
                    help="validate on the first N cases of --val (0: all)")
    ap.add_argument("--val-clicks", type=int, default=1,
                    help="click stages per validation case after the box stage (5: all of the "
                         "organizer's; val_dsc_auc needs 5)")
    ap.add_argument("--best-metric", choices=VAL_METRICS, default="val_final_dsc",
                    help="validation number (higher is better) that picks the epoch copied to OUT/best")
    ap.add_argument("--keep", type=int, default=2,
                    help="epoch checkpoint folders kept, the newest (0: all); OUT/best and "
                         "OUT/final are kept apart")
    ap.add_argument("--quick", action="store_true",
                    help="a first run in minutes on a CPU: " + ", ".join(
                        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                        for k, v in QUICK.items()) + " (flags given override them)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--box-style", choices=("2d", "3d"), default=None,
                    help="box drawing of the trained model (default: the init card's; 2d from scratch)")
    ap.add_argument("--demo", action="store_true", help="mark the model card as a demo model")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        ap.set_defaults(**QUICK)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    ctx = setup(a.device, a.dist_timeout)
    try:
        return _run(a, argv, ctx)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback, the shell's status for SIGINT
        if ctx.is_main:
            print(interrupted_message(a.out), file=sys.stderr, flush=True)
        return 130
    finally:
        teardown(ctx)


def _run(a, argv, ctx) -> int:
    say = (lambda msg: print(msg, file=sys.stderr)) if ctx.is_main else (lambda msg: None)
    # worker processes read cases from their files; in-process sampling keeps them in memory
    cases = index_folder(a.data) if a.workers > 0 else load_folder(a.data)
    cmd = "python -m train " + " ".join(sys.argv[1:] if argv is None else argv)
    ran = f"`{cmd}` ({time.strftime('%Y-%m-%d')})"  # the command and the day, for the card
    source = f"trained with {ran}"
    net, card = build_model(a.init, a.config, a.seed, a.box_style, a.demo, source)
    if card.demo and not a.demo and latest_checkpoint(a.out) is None:
        say(f"{a.init} is a demo model: the trained model's card keeps \"demo\": true "
            "(build.sh builds it only with --demo)")
    if a.val and ctx.is_main:
        validate = make_validator(a.val, a.val_n or None, a.val_clicks,
                                  log=lambda line: tqdm.write(line, file=sys.stderr))
    else:
        validate = None
    global_batch = a.batch_size * ctx.world_size
    lr = scaled_lr(a.lr, global_batch, a.lr_scale)
    trainer = Trainer(net, card, cases, a.out, epochs=a.epochs, steps_per_epoch=a.steps_per_epoch,
                      batch_size=a.batch_size, lr=lr, lr_schedule=a.lr_schedule, weight_decay=a.weight_decay, seed=a.seed,
                      p_box=a.p_box, p_second=a.p_second, device=a.device, validate=validate,
                      progress=not a.no_progress,
                      sim_autozoom=not a.no_sim_autozoom, p_zoom_out=a.p_zoom_out,
                      p_refine=a.p_refine, dist=ctx, workers=a.workers, policy=a.policy,
                      keep=a.keep, best_metric=a.best_metric)
    if latest_checkpoint(a.out) is not None:
        trainer.resume()
        say(f"resuming {a.out} after epoch {trainer.epoch} (step {trainer.step}); --init ignored")
        if f"`{cmd}`" not in trainer.card.source:  # the card says which commands made the model
            trainer.card.source += f"; resumed after epoch {trainer.epoch} with {ran}"
    # every rank must resume from the same checkpoint (OUT on a filesystem all nodes see)
    ctx.check_same(trainer.epoch, f"the epoch to resume {a.out} from (is it shared by all nodes?)")
    say(f"{len(cases)} training cases, {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M "
        f"parameters, patch {list(card.patch_size)}, device {trainer.device}"
        + (f", {ctx.world_size} processes x batch {a.batch_size} = global batch {global_batch}, "
           f"lr {lr:.3g}" if ctx.enabled else ""))
    t0 = time.time()
    final = trainer.fit()
    best = f"; best by {a.best_metric}: {a.out}/{BEST}" if validate is not None else ""
    say(f"done in {time.time() - t0:.0f} s: {final}{best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
