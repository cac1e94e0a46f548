"""Memory limits of a run, without numpy or torch (``python -m infer --help`` reads them).

Peak host memory of ``python -m infer`` per voxel of ``imgs``: 2.57 GB for 300 x 512 x 512
(78.6 M voxels) in scripts/memory_bench.py, i.e. 32.7 B/voxel with the interpreter and torch
included (docs/HARDENING.md). Rounded to 32 and applied to the memory the run may use.
"""

BYTES_PER_VOXEL = 32
DEFAULT_MEMORY_GB = 28.0  # of the harness's 32 GB container: 4 GB left for weights and slack
