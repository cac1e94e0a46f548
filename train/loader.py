"""Training examples through a DataLoader: worker processes read and prepare cases, the main
process runs what needs the network.

An epoch has ``n_slots`` = steps x batch x world_size example slots. Slot ``j`` of epoch ``e`` is
the pair ``(case, label) = epoch_plan(cases, n_slots, default_rng([seed, e]))[j]`` (cases cycled
in a shuffled order) built with its own generator ``default_rng([seed, e, j])``. An example is
therefore a function of ``(seed, e, j)`` and of the network only: the same whichever rank, worker
or batch position builds it, so a run on N processes with batch b takes the same steps as one
process with batch N x b.

:class:`EpochSampler` is a ``DistributedSampler`` over the slots (no second shuffle: the plan is
already shuffled per epoch), yielding ``(epoch, slot)``: rank r of N takes slots r, r + N, ...,
so step i of all ranks together covers slots [i N b, (i + 1) N b), the global batch i of a single
process. ``set_epoch`` works with persistent workers because the epoch travels with the index.

:class:`ExampleSet` (in the workers) reads the case (``Case.load``: from memory, or from its npz
file for a lazily indexed folder), normalises the image and tries the whole prompt simulation
without the network (``train.simulate.SimModel.without_network``: crops come from the trainer's
model card and interaction policy, ``infer.policy``): an example that never needs the network
(no second step) comes back finished, as a patch-sized input and target. One that does raises
``train.simulate.ModelNeeded`` and comes back as the case's arrays; the main process then runs
the simulation again from the slot's generator with the trainer's model (its engine on the
network being trained, on the training device), which gives exactly the example a direct run
gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from infer.predictor import normalize_image

from .data import epoch_plan
from .simulate import ModelNeeded, SimModel


def slot_rng(seed: int, epoch: int, slot: int) -> np.random.Generator:
    """The generator of example slot ``slot`` of epoch ``epoch`` (0-based)."""
    return np.random.default_rng([int(seed), int(epoch), int(slot)])


@dataclass
class Item:
    """One slot as a worker hands it over. Finished: ``x`` (C, *patch) and ``target`` (*patch)
    float32 on the CPU. Deferred (``x`` None): ``imgs`` (D, H, W) as stored, ``gt`` (D, H, W)
    bool, ``image`` the normalised float32 image (CPU) or None when the main process normalises
    on its device."""
    epoch: int
    slot: int
    x: Optional[torch.Tensor] = None
    target: Optional[torch.Tensor] = None
    imgs: Optional[np.ndarray] = None
    gt: Optional[np.ndarray] = None
    image: Optional[torch.Tensor] = None


def _as_list(items):
    return list(items)


class ExampleSet(Dataset):
    """Indexed by ``(epoch, slot)`` (see the module docstring).

    ``simulate(model, imgs, gt, rng, image=...) -> Example``: the trainer's prompt simulation
    (``train.simulate.simulate_example`` with its settings). ``model``: the trainer's
    ``SimModel``; the workers build network-free examples with its card and interaction policy
    alone. ``normalize``: normalise images in the worker (True for CPU training; on a GPU the
    main process does it on the device).
    """

    def __init__(self, cases, simulate: Callable, model: SimModel, seed: int, n_slots: int,
                 normalize: bool = True):
        self.cases, self.simulate = cases, simulate
        self.seed, self.n_slots, self.normalize = int(seed), int(n_slots), bool(normalize)
        self.model = model.without_network()
        self._plan = (None, None)

    def __len__(self) -> int:
        return self.n_slots

    def plan(self, epoch: int) -> list:
        if self._plan[0] != epoch:
            rng = np.random.default_rng([self.seed, int(epoch)])
            self._plan = (epoch, epoch_plan(self.cases, self.n_slots, rng))
        return self._plan[1]

    def __getitem__(self, index) -> Item:
        epoch, slot = index
        ci, label = self.plan(epoch)[slot]
        case = self.cases[ci].load()
        gt = case.gts == label
        # normalised here only when a deferred item carries the image to the main process (CPU
        # training); otherwise the simulation normalises it when it builds a finished example
        image = normalize_image(case.imgs, torch.device("cpu")) if self.normalize else None
        try:
            ex = self.simulate(self.model, case.imgs, gt, slot_rng(self.seed, epoch, slot),
                               image=image)
        except ModelNeeded:
            return Item(epoch, slot, imgs=case.imgs, gt=gt, image=image)
        return Item(epoch, slot, x=ex.x, target=ex.target)


class EpochSampler(DistributedSampler):
    """This rank's share of an epoch's slots, in order, as ``(epoch, slot)`` pairs."""

    def __init__(self, n_slots: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(n_slots), num_replicas=num_replicas, rank=rank, shuffle=False,
                         drop_last=True)

    def __iter__(self):
        return ((self.epoch, int(j)) for j in super().__iter__())


def make_loader(dataset: ExampleSet, batch_size: int, world_size: int = 1, rank: int = 0,
                workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader of lists of :class:`Item` (``batch_size`` per step) for this rank;
    ``workers`` > 0 keeps that many worker processes alive across epochs."""
    sampler = EpochSampler(len(dataset), world_size, rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=_as_list, persistent_workers=workers > 0,
                      pin_memory=pin_memory, prefetch_factor=2 if workers > 0 else None)


def finish_batch(items: list, simulate: Callable, model: SimModel, seed: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, target) of a batch on ``device``: finished items as they are, deferred ones simulated
    here with ``model`` (the trainer's, its engine on ``device``) from their slot's generator."""
    xs, ts = [], []
    for it in items:
        if it.x is None:
            image = (it.image.to(device) if it.image is not None
                     else normalize_image(it.imgs, device))
            ex = simulate(model, it.imgs, it.gt, slot_rng(seed, it.epoch, it.slot), image=image)
            x, t = ex.x, ex.target
        else:
            x, t = it.x, it.target
        xs.append(x.to(device, non_blocking=True))
        ts.append(t.to(device, non_blocking=True))
    return torch.stack(xs), torch.stack(ts)
