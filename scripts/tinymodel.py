"""Tiny configurations, nnInteractive-layout release folders and converted artifacts for tests.

Everything is small enough to build and run on CPU in well under a second. Spatial sizes are
(z, y, x). The tiny architecture is anisotropic on purpose (stage 1 does not downsample z) so that
axis-order mistakes show up.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from infer.card import DEFAULT_CHANNELS, ModelCard
from infer.convert import write_artifact
from infer.network import build_network

NUM_CLASSES = 2
IN_CHANNELS = len(DEFAULT_CHANNELS)
TINY_PATCH = (16, 32, 32)


def tiny_arch() -> dict:
    """4 stages, 4-8-16-16 features, strides 1 / (1,2,2) / 2 / 2 -> spatial divisor (4, 8, 8)."""
    return {
        "n_stages": 4,
        "features_per_stage": [4, 8, 16, 16],
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
        "n_blocks_per_stage": [1, 2, 2, 1],
        "n_conv_per_stage_decoder": [1, 2, 1],
        "conv_bias": True,
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "nonlin_kwargs": {"inplace": True},
    }


def nninteractive_v1_arch() -> dict:
    """The published nnInteractive v1.0 (ResEnc-L) architecture, in nnU-Net's plans layout."""
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
        "arch_kwargs": {
            "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 6,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
            "n_conv_per_stage_decoder": [1, 1, 1, 1, 1], "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def plans_block(arch: dict) -> dict:
    """A bare arch dict wrapped the way nnU-Net's plans.json stores it (ops as strings)."""
    if "arch_kwargs" in arch:
        return arch
    kw = dict(arch, conv_op="torch.nn.modules.conv.Conv3d",
              norm_op="torch.nn.modules.instancenorm.InstanceNorm3d", dropout_op=None,
              dropout_op_kwargs=None, nonlin="torch.nn.LeakyReLU")
    return {"network_class_name":
            "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
            "arch_kwargs": kw, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def tiny_network(arch=None, seed: int = 0, num_classes: int = NUM_CLASSES):
    """Our network with seeded random parameters (norm affine parameters perturbed too, so a
    swapped or dropped tensor changes the output). Eval mode."""
    torch.manual_seed(seed)
    net = build_network(arch or tiny_arch(), IN_CHANNELS, num_classes)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".norm." in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def make_release_folder(path, arch=None, patch_size=TINY_PATCH, seed: int = 0, nested: str = "",
                        session_info="dict", configuration: str = "3d_fullres_ps16",
                        network=None) -> Path:
    """Write an nnInteractive-layout release into ``path`` (or ``path/nested``); return that folder.

    The checkpoint mirrors the real one's kinds of entries: network_weights (with aliased keys),
    an empty optimizer state, grad_scaler_state None, a 'logging' dict of numpy.float64 lists,
    init_args with plans / configuration / fold / dataset_json / torch.device, trainer_name and a
    tuple. The configuration inherits its architecture from '3d_fullres' and sets patch_size.
    session_info: "dict" (point_radius 4, interaction_decay 0.9), "str" (bare class name) or a dict.
    """
    import numpy as np
    root = Path(path) / nested if nested else Path(path)
    (root / "fold_0").mkdir(parents=True, exist_ok=True)
    net = network if network is not None else tiny_network(arch, seed)
    plans = {
        "dataset_name": "Dataset_tiny", "plans_name": "nnUNetResEncUNetLPlans",
        "configurations": {
            "3d_fullres": {"data_identifier": "tiny_3d_fullres", "patch_size": [64, 64, 64],
                           "spacing": [1.0, 1.0, 1.0], "architecture": plans_block(net.arch)},
            configuration: {"inherits_from": "3d_fullres", "patch_size": list(patch_size)},
        },
    }
    dataset = {"channel_names": {"0": "image"}, "labels": {"background": 0, "object": 1},
               "numTraining": 1, "file_ending": ".nii.gz"}
    info = session_info
    if session_info == "dict":
        info = {"inference_class": "nnInteractiveInferenceSession", "point_radius": 4,
                "preferred_scribble_thickness": [2, 2, 2], "interaction_decay": 0.9}
    elif session_info == "str":
        info = "nnInteractiveInferenceSession"
    for name, obj in (("plans.json", plans), ("dataset.json", dataset),
                      ("inference_session_class.json", info)):
        (root / name).write_text(json.dumps(obj, indent=1))
    f64 = np.float64
    checkpoint = {
        "network_weights": net.state_dict(),
        "optimizer_state": {"state": {}, "param_groups": []},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [f64(0.5), f64(0.61)], "ema_fg_dice": [f64(0.5), f64(0.51)],
                    "dice_per_class_or_region": [[f64(0.5)], [f64(0.61)]],
                    "train_losses": [f64(-0.2), f64(-0.3)], "lrs": [0.01, 0.0099],
                    "epoch_start_timestamps": [1.0, 2.0]},
        "_best_ema": f64(0.51),
        "current_epoch": 2,
        "init_args": {"plans": plans, "configuration": configuration, "fold": 0,
                      "dataset_json": dataset, "unpack_dataset": True,
                      "device": torch.device("cpu")},
        "trainer_name": "nnInteractiveTrainer_stub",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(checkpoint, root / "fold_0" / "checkpoint_final.pth")
    return root


def make_artifact(path, arch=None, patch_size=TINY_PATCH, seed: int = 0, box_style: str = "2d",
                  demo: bool = True, network=None, **card_fields) -> Path:
    """Write a converted artifact (weights.pt + model_card.json with sha256) into ``path``."""
    net = network if network is not None else tiny_network(arch, seed)
    card = ModelCard(architecture=net.arch, input_channels=net.input_channels,
                     num_classes=net.num_classes, patch_size=list(patch_size),
                     box_style=box_style, demo=demo,
                     source=card_fields.pop("source", f"tests.tinymodel seed {seed}"), **card_fields)
    return write_artifact(path, net.state_dict(), card)
