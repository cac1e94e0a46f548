"""Named training configurations: architecture block (``infer.network`` format) + patch size.

A configuration only fixes what the network looks like; everything about prompts (box style,
click radius, decay) lives in the model card the run writes, taken from the initial weights when
fine-tuning and from ``CARD_DEFAULTS`` when training from scratch.
"""
from __future__ import annotations

import copy


def _arch(features, blocks, strides, kernels=None):
    n = len(features)
    return {
        "n_stages": n,
        "features_per_stage": list(features),
        "kernel_sizes": kernels or [[3, 3, 3]] * n,
        "strides": strides,
        "n_blocks_per_stage": list(blocks),
        "n_conv_per_stage_decoder": [1] * (n - 1),
        "conv_bias": True,
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "nonlin_kwargs": {"inplace": True},
    }


CONFIGS = {
    # for tests: ~20 k parameters, runs a step in well under a second on CPU
    "tiny": {
        "architecture": _arch([4, 8, 16, 16], [1, 1, 1, 1],
                              [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                              kernels=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
        "patch_size": [16, 32, 32],
    },
    # the demo model's configuration from scratch (runs 1-4 of docs/TRAINING.md): 0.61 M
    # parameters (2.4 MB float32), ~0.15 s per batch of 2 on 2 idle CPU cores (forward +
    # backward); the committed weights/demo is this widened x2 (python -m train.widen, run 7)
    "demo": {
        "architecture": _arch([8, 16, 32, 64], [1, 2, 2, 2],
                              [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]),
        "patch_size": [32, 32, 32],
    },
}

# Prompt settings of a model trained from scratch: those of nnInteractive v1.0 (``--box-style``
# overrides the box style; the demo model uses "3d", see docs/TRAINING.md).
CARD_DEFAULTS = {"box_style": "2d", "click_radius": 4, "prompt_decay": 0.9}


def get_config(name: str) -> dict:
    """A deep copy of configuration ``name`` (KeyError listing the known names otherwise)."""
    if name not in CONFIGS:
        raise KeyError(f"unknown configuration {name!r}; known: {sorted(CONFIGS)}")
    return copy.deepcopy(CONFIGS[name])
