"""The training loop: batches of simulated examples, 10 x Dice + CE, AdamW, per-epoch checkpoints.

``Trainer(...).fit()`` trains ``epochs`` epochs of ``steps_per_epoch`` batches. Example sampling
for epoch ``e`` draws from ``np.random.default_rng([seed, e])`` only, so a run resumed from the
checkpoint of epoch ``e`` (network weights, optimizer and grad-scaler state, epoch counter) takes
exactly the steps an uninterrupted run takes. An epoch interrupted half-way is redone from its
start. After each epoch an optional ``validate(network, card, device, policy) -> dict`` runs (the
warm evaluation of the network being trained, ``train.validate``); its numbers go to
``OUT/log.jsonl`` with the epoch's mean loss; when its ``best_metric`` (higher is better) beats
every earlier epoch's, the epoch's artifact is copied to ``OUT/best``
(``train.checkpoint.save_best``). Only the newest ``keep`` epoch folders stay (<= 0: all).

Distributed (``dist``: a ``train.distributed.DistContext`` of more than one process) or with
data-loader worker processes (``workers`` > 0), examples come from ``train.loader`` instead: one
generator per example slot, ``default_rng([seed, epoch, slot])``, so that the examples do not
depend on how they are split over ranks and workers. The in-process stream above (one generator
per epoch) is kept for single-process runs with ``workers=0``, so their results do not change.
Only rank 0 writes checkpoints, the log and ``OUT/final``, shows progress and validates; the
reported loss is the mean over ranks (the loss of the global batch).
"""
from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from infer.card import ModelCard
from infer.predictor import normalize_image

from .checkpoint import (BEST, export_final, is_better, latest_checkpoint, load_checkpoint, read_best,
                         save_best, save_checkpoint)
from .data import Case, epoch_plan
from .distributed import DistContext
from .loader import ExampleSet, finish_batch, make_loader
from .loss import dice_ce_loss
from .simulate import SimModel, simulate_example


class Trainer:
    def __init__(self, network: torch.nn.Module, card: ModelCard, cases: list[Case], out,
                 epochs: int = 10, steps_per_epoch: int = 100, batch_size: int = 2,
                 lr: float = 1e-4, weight_decay: float = 3e-5, seed: int = 0,
                 p_box: float = 0.5, p_second: float = 0.5, dice_weight: float = 10.0,
                 lr_schedule: str = "constant", device: Optional[str] = None,
                 amp: Optional[bool] = None,
                 validate: Optional[Callable[..., dict]] = None, progress: bool = True,
                 keep: int = 2, sim_autozoom: bool = True, p_zoom_out: float = 0.0,
                 p_refine: float = 0.0, dist: Optional[DistContext] = None, workers: int = 0,
                 policy=None, best_metric: str = "val_final_dsc"):
        self.dist = dist or DistContext.single(device)
        self.device = self.dist.device
        self.network = network.to(self.device).train().requires_grad_(True)
        self.card = card
        self.cases = cases
        self.out = Path(out)
        self.epochs, self.steps_per_epoch, self.batch_size = int(epochs), int(steps_per_epoch), int(batch_size)
        self.seed = int(seed)
        self.p_box, self.p_second, self.dice_weight = float(p_box), float(p_second), float(dice_weight)
        self.validate = validate
        self.progress = progress and self.dist.is_main
        self.keep = int(keep)
        self.best_metric = best_metric
        self.amp = (self.device.type == "cuda") if amp is None else bool(amp and self.device.type == "cuda")
        if lr_schedule not in ("constant", "poly"):
            raise ValueError(f"lr_schedule must be 'constant' or 'poly', not {lr_schedule!r}")
        self.lr, self.lr_schedule = float(lr), lr_schedule
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=lr, weight_decay=weight_decay)
        self.model = self.dist.wrap(self.network)  # training forward/backward (DDP when distributed)
        self.workers = int(workers)
        self.loader = None  # built on first use (train.loader)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        # the network being trained as the prompt simulation drives it: an engine on it and the
        # interaction policy (``infer.policy``; None: the card's, else "project") whose crops the
        # examples are cut on; the no-grad first prediction of the second step may skip zooming
        # out (sim_autozoom=False) to save the extra forward passes an untrained network's
        # everywhere-positive output triggers
        self.sim = SimModel.of(self.network, card, self.device, policy)
        self.sim_autozoom = bool(sim_autozoom)
        self.p_zoom_out = float(p_zoom_out)
        self.p_refine = float(p_refine)
        # the prompt simulation with this run's settings (picklable, for data-loader workers too)
        self.simulate = functools.partial(simulate_example, p_box=self.p_box, p_second=self.p_second,
                                          autozoom=self.sim_autozoom, p_zoom_out=self.p_zoom_out,
                                          p_refine=self.p_refine)
        self.epoch = 0   # completed epochs
        self.step = 0    # optimizer steps taken
        self.after_step: Optional[Callable[[int, int], None]] = None  # hook (epoch, step_in_epoch)

    # ------------------------------------------------------------------ resume
    def resume(self) -> bool:
        """Load ``OUT``'s newest complete checkpoint if there is one; True when loaded."""
        folder = latest_checkpoint(self.out)
        if folder is None:
            return False
        sd, card, state = load_checkpoint(folder)
        self.network.load_state_dict(sd, strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.card = card
        self.sim = SimModel.of(self.network, card, self.device, self.sim.policy)
        return True

    # ------------------------------------------------------------------ one batch
    def make_batch(self, plan, rng: np.random.Generator):
        xs, ts = [], []
        for ci, label in plan:
            case = self.cases[ci]
            gt = case.gts == label
            image = normalize_image(case.imgs, self.device)
            ex = self.simulate(self.sim, case.imgs, gt, rng, image=image)
            xs.append(ex.x)
            ts.append(ex.target)
        return torch.stack(xs), torch.stack(ts)

    def inprocess_batches(self, e: int):
        """The batches of epoch ``e`` from one generator, ``default_rng([seed, e])``."""
        rng = np.random.default_rng([self.seed, e])
        plan = epoch_plan(self.cases, self.steps_per_epoch * self.batch_size, rng)
        for i in range(self.steps_per_epoch):
            yield self.make_batch(plan[i * self.batch_size:(i + 1) * self.batch_size], rng)

    def loader_batches(self, e: int):
        """This rank's batches of epoch ``e`` through ``train.loader`` (one generator per slot)."""
        if self.loader is None:
            n_slots = self.steps_per_epoch * self.batch_size * self.dist.world_size
            examples = ExampleSet(self.cases, self.simulate, self.sim, self.seed, n_slots,
                                  normalize=self.device.type == "cpu")
            self.loader = make_loader(examples, self.batch_size, self.dist.world_size,
                                      self.dist.rank, self.workers,
                                      pin_memory=self.device.type == "cuda")
        self.loader.sampler.set_epoch(e)
        for items in self.loader:
            yield finish_batch(items, self.simulate, self.sim, self.seed, self.device)

    def train_step(self, x: torch.Tensor, target: torch.Tensor) -> float:
        """One optimizer step on this rank's batch; returns the loss of the global batch (the
        mean over ranks)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            logits = self.model(x)
        loss = dice_ce_loss(logits, target, self.dice_weight)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return self.dist.mean(float(loss.detach()))

    # ------------------------------------------------------------------ epochs
    def epoch_lr(self, epoch: int) -> float:
        """Learning rate of epoch ``epoch`` (0-based): constant, or nnU-Net's poly decay
        ``lr * (1 - epoch / epochs) ** 0.9``."""
        if self.lr_schedule == "poly":
            return self.lr * (1 - epoch / self.epochs) ** 0.9
        return self.lr

    def train_epoch(self) -> float:
        e = self.epoch
        for group in self.optimizer.param_groups:
            group["lr"] = self.epoch_lr(e)
        use_loader = self.workers > 0 or self.dist.enabled
        batches = self.loader_batches(e) if use_loader else self.inprocess_batches(e)
        bar = tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {e + 1}/{self.epochs}",
                   disable=not self.progress, dynamic_ncols=True, mininterval=2.0)
        total, running = 0.0, None
        for i, (x, t) in enumerate(bar):
            loss = self.train_step(x, t)
            total += loss
            running = loss if running is None else 0.95 * running + 0.05 * loss
            bar.set_postfix(loss=f"{running:.3f}")
            if self.after_step is not None:
                self.after_step(e, i)
        return total / max(self.steps_per_epoch, 1)

    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.amp else {},
                "epoch": self.epoch, "step": self.step, "seed": self.seed}

    def fit(self) -> Path:
        """Train until ``epochs`` epochs are complete (continuing a resumed run); returns OUT/final."""
        self.out.mkdir(parents=True, exist_ok=True)
        while self.epoch < self.epochs:
            t0 = time.time()
            mean_loss = self.train_epoch()
            self.epoch += 1
            if not self.dist.is_main:  # rank 0 alone checkpoints, validates and logs
                self.dist.barrier()
                continue
            save_checkpoint(self.out, self.epoch, self.network.state_dict(), self.card, self.state(),
                            keep=self.keep)
            record = {"epoch": self.epoch, "step": self.step, "loss": mean_loss,
                      "lr": self.epoch_lr(self.epoch - 1),
                      "train_s": round(time.time() - t0, 1)}
            best_line = None
            if self.validate is not None:
                t1 = time.time()
                record.update(self.validate(self.network, self.card, self.device, self.sim.policy))
                record["val_s"] = round(time.time() - t1, 1)
                value = record.get(self.best_metric)
                best = read_best(self.out)
                if is_better(value, best, self.best_metric):
                    folder = save_best(self.out, self.network.state_dict(), self.card,
                                       {"epoch": self.epoch, "step": self.step,
                                        "metric": self.best_metric, "value": value,
                                        "higher_is_better": True})
                    record["best"] = True
                    best_line = (f"best so far: epoch {self.epoch}, {self.best_metric}={value:.4g} "
                                 f"-> {folder}")
                elif best is not None:
                    best_line = (f"best stays epoch {best['epoch']}, {best['metric']}="
                                 f"{best['value']:.4g} ({self.out / BEST})")
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                    for k, v in record.items()}) + "\n")
            # the epoch line is printed with or without the progress bar (rank 0 only)
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v)
                                else f"{k}={v}" for k, v in record.items()))
            if best_line:
                tqdm.write(best_line)
            self.dist.barrier()
        final = (export_final(self.out, self.network.state_dict(), self.card) if self.dist.is_main
                 else self.out / "final")
        self.dist.barrier()
        return final
