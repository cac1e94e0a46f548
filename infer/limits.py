"""Memory limits of a run, without numpy or torch (``python -m infer --help`` reads them).

One model, in bytes, of the predictor's peak host memory for a case, from what its headers
declare (``infer.npz`` applies it before anything is allocated)::

    peak bytes = voxels x (FIXED + PER_IMGS_BYTE x imgs itemsize
                           [+ PREV_FIXED + PER_PREV_BYTE x prev_pred itemsize, with a prev_pred])

Measured with ``scripts/memory_bench.py --shape 96 256 256 --classes 3 [--dtype D]
[--prev-dtype P]`` (tiny model, CPU; 2-core CPU, no GPU, shared with a training run: load 2.5-5.6):
the child's peak RSS minus its peak on a 16 x 16 x 16 case (263 MB box stage, 267 MB click
stage: interpreter, torch, model), per voxel (6.29 M voxels), against the model:

    imgs        prev_pred    measured   model
    uint8       -              22.0      22.5
    int16       -              22.9      24
    float32     -              25.8      27
    float64     -              32.3      33
    float128    -              32.1      45     (read as float64, counted at 16 bytes)
    uint8       uint8          25.8      27.25
    int16       uint8          26.9      28.75
    float32     uint8          28.2      31.75
    float64     uint8          33.2      37.75
    uint8       float64        32.7      36
    int16       int16          27.8      30
    float32     float32        31.3      35.5
    float64     float64        39.0      46.5
    float128    float128       40.1      68.5

FIXED and PER_IMGS_BYTE are the least round figures above every image-only row (slope 1.48
bytes per byte of itemsize from uint8 to float64); a prev_pred costs 3.9 B/voxel as uint8 and
10.8 as float64 beside a uint8 image, hence a fixed part besides the part per byte (a part per
byte alone would charge a float64 prev_pred 8 x 3.9). The per-voxel figures fall with size (the
300 x 512 x 512 uint8 click case of docs/HARDENING.md: 22.4 B/voxel beyond the interpreter), so
the model measured at 6.29 M voxels errs high for CT-sized cases. ``--memory-gb`` (default 28 of
the harness's 32 GB container) is compared with the model; the rest (4 GB) covers the fixed
0.27 GB of the interpreter and torch, the weights (0.4 GB for v1.0) and a CUDA context.
"""
import math

FIXED = 21.0
PER_IMGS_BYTE = 1.5
PREV_FIXED = 3.5
PER_PREV_BYTE = 1.25
DEFAULT_MEMORY_GB = 28.0  # of the harness's 32 GB container: 4 GB left for weights and slack
GB = 2**30  # what --memory-gb counts in


def bytes_per_voxel(imgs_itemsize: int, prev_itemsize: int | None = None) -> float:
    """The model's peak bytes per voxel for ``imgs`` of ``imgs_itemsize`` bytes and, when given,
    a ``prev_pred`` of ``prev_itemsize`` bytes."""
    per = FIXED + PER_IMGS_BYTE * int(imgs_itemsize)
    return per if prev_itemsize is None else per + PREV_FIXED + PER_PREV_BYTE * int(prev_itemsize)


def peak_bytes(voxels: int, imgs_itemsize: int, prev_itemsize: int | None = None) -> int:
    """The model's peak bytes for a case of ``voxels`` voxels (see the module docstring), rounded up."""
    return math.ceil(int(voxels) * bytes_per_voxel(imgs_itemsize, prev_itemsize))
