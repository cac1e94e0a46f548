"""nnU-Net's residual-encoder U-Net, rebuilt from a plans.json ``architecture`` block (torch only).

The module tree mirrors dynamic-network-architectures 0.4.4 (``ResidualEncoderUNet`` with
``BasicBlockD`` blocks and ``UNetDecoder``) name for name, so a checkpoint's state dict loads
strictly, including the aliased keys it keeps: every conv block registers its conv / norm / nonlin
both as attributes and inside ``all_modules`` (``...conv.weight`` == ``...all_modules.0.weight``),
and the decoder holds the encoder again (``decoder.encoder.*``).

Tensors are (B, C, Z, Y, X), axis order of the volume (z, y, x). Only 3D is supported
(Conv3d / InstanceNorm3d / LeakyReLU), deep supervision is off: ``forward`` returns the
highest-resolution logits only.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

# Keys of a canonical architecture dict (what the model card stores).
ARCH_KEYS = ("n_stages", "features_per_stage", "kernel_sizes", "strides", "n_blocks_per_stage",
             "n_conv_per_stage_decoder", "conv_bias", "norm_op_kwargs", "nonlin_kwargs")
_OPS = {"conv_op": nn.Conv3d, "norm_op": nn.InstanceNorm3d, "nonlin": nn.LeakyReLU}
_IGNORED = ("dropout_op_kwargs",)


class ArchitectureError(ValueError):
    """The architecture block cannot be built by this module."""


def _check_op(key: str, value) -> None:
    expected = _OPS[key]
    if value is None or value is expected:
        return
    if isinstance(value, str):
        head, _, last = value.rpartition(".")
        if last == expected.__name__ and (head == "" or head.startswith("torch.nn")):
            return
    raise ArchitectureError(f"{key}={value!r} is not supported: only {expected.__module__}."
                            f"{expected.__name__} is implemented")


def _per_stage(name: str, value, n: int, width: int | None = None) -> list:
    """Expand a scalar to n entries (each a list of `width` ints when width is given)."""
    if not isinstance(value, (list, tuple)):
        value = [value] * n
    if len(value) != n:
        raise ArchitectureError(f"{name} has {len(value)} entries, expected {n}")
    if width is None:
        return [int(v) for v in value]
    out = []
    for v in value:
        v = [v] * width if not isinstance(v, (list, tuple)) else list(v)
        if len(v) != width:
            raise ArchitectureError(f"{name} entry {v} must have {width} values (z, y, x)")
        out.append([int(i) for i in v])
    return out


def normalize_arch(arch: dict) -> dict:
    """Validate an architecture block and return the canonical dict (keys ARCH_KEYS, lists expanded).

    Accepts the bare ``arch_kwargs`` or nnU-Net's ``{"network_class_name", "arch_kwargs",
    "_kw_requires_import"}`` wrapper. conv_op / norm_op / nonlin may be absent, the torch classes,
    or strings naming Conv3d / InstanceNorm3d / LeakyReLU; anything else raises ArchitectureError.
    """
    if not isinstance(arch, dict):
        raise ArchitectureError(f"architecture must be a dict, got {type(arch).__name__}")
    if "arch_kwargs" in arch:
        name = arch.get("network_class_name", "")
        if not str(name).endswith("ResidualEncoderUNet"):
            raise ArchitectureError(f"network_class_name {name!r} is not a ResidualEncoderUNet")
        arch = arch["arch_kwargs"]
    unknown = set(arch) - set(ARCH_KEYS) - set(_OPS) - set(_IGNORED) - {"dropout_op"}
    if unknown:
        raise ArchitectureError(f"unsupported architecture keys: {sorted(unknown)}")
    missing = [k for k in ARCH_KEYS[:6] if k not in arch]
    if missing:
        raise ArchitectureError(f"architecture is missing {missing}")
    for key in _OPS:
        _check_op(key, arch.get(key))
    if arch.get("dropout_op") is not None:
        raise ArchitectureError(f"dropout_op={arch['dropout_op']!r} is not supported (expected None)")
    n = int(arch["n_stages"])
    if n < 2:
        raise ArchitectureError(f"n_stages must be >= 2, got {n}")
    out = {
        "n_stages": n,
        "features_per_stage": _per_stage("features_per_stage", arch["features_per_stage"], n),
        "kernel_sizes": _per_stage("kernel_sizes", arch["kernel_sizes"], n, 3),
        "strides": _per_stage("strides", arch["strides"], n, 3),
        "n_blocks_per_stage": _per_stage("n_blocks_per_stage", arch["n_blocks_per_stage"], n),
        "n_conv_per_stage_decoder": _per_stage("n_conv_per_stage_decoder",
                                               arch["n_conv_per_stage_decoder"], n - 1),
        "conv_bias": bool(arch.get("conv_bias", False)),
        "norm_op_kwargs": dict(arch.get("norm_op_kwargs") or {}),
        "nonlin_kwargs": dict(arch.get("nonlin_kwargs") or {}),
    }
    if min(out["n_blocks_per_stage"] + out["n_conv_per_stage_decoder"]) < 1:
        raise ArchitectureError("every stage needs at least one block / decoder conv")
    for key in ("features_per_stage", "kernel_sizes", "strides"):
        flat = [v for entry in out[key] for v in (entry if isinstance(entry, list) else [entry])]
        if min(flat) < 1:
            raise ArchitectureError(f"{key} must be >= 1 everywhere, got {out[key]}")
    return out


class _NoInitOnMeta:
    """Skips the random initialisation of parameters that live on the meta device (the network
    is built there and then takes the loaded tensors, ``load_state_dict(assign=True)``): there is
    nothing to initialise, and on torch 2.8 ``uniform_`` on a meta tensor imports
    ``torch.fx.experimental.symbolic_shapes`` and with it sympy, which the image leaves out."""

    def reset_parameters(self):
        if self.weight.is_meta:
            return
        super().reset_parameters()


class Conv3d(_NoInitOnMeta, nn.Conv3d):
    """nn.Conv3d (same parameters and state-dict keys) that, for float32 inference on the CPU,
    always runs oneDNN's convolution.

    PyTorch's CPU dispatch sends a batch-1 3x3x3 convolution whose ``C * D * H`` is at most
    20 480 (e.g. 8 channels on a 40^3 patch) to its im2col fallback ``slow_conv3d``, measured
    ~25x slower than oneDNN on such layers (see docs/PERFORMANCE.md). With autograd on, or on
    any other device or dtype, the stock path runs unchanged."""

    def _conv_forward(self, input, weight, bias):
        if (input.device.type == "cpu" and input.dtype == torch.float32 and weight.dtype == torch.float32
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return torch.ops.aten.mkldnn_convolution(input.contiguous(), weight.contiguous(), bias,
                                                     list(self.padding), list(self.stride),
                                                     list(self.dilation), self.groups)
        return super()._conv_forward(input, weight, bias)


class ConvTranspose3d(_NoInitOnMeta, nn.ConvTranspose3d):
    """nn.ConvTranspose3d (same parameters and state-dict keys), not initialised on meta."""


class ConvNormAct(nn.Module):
    """Conv3d ('same' padding for odd kernels) -> InstanceNorm3d -> optional LeakyReLU.

    Registers ``conv``, ``norm``, ``nonlin`` and the same modules again in ``all_modules``
    (DNA's ConvDropoutNormReLU layout, hence the aliased state-dict keys).
    """

    def __init__(self, cin, cout, kernel, stride, bias, norm_kw, nonlin_kw=None):
        super().__init__()
        kernel = [kernel] * 3 if isinstance(kernel, int) else list(kernel)
        self.conv = Conv3d(cin, cout, kernel, stride, padding=[(k - 1) // 2 for k in kernel], bias=bias)
        self.norm = nn.InstanceNorm3d(cout, **norm_kw)
        mods = [self.conv, self.norm]
        if nonlin_kw is not None:
            self.nonlin = nn.LeakyReLU(**nonlin_kw)
            mods.append(self.nonlin)
        self.all_modules = nn.Sequential(*mods)

    def forward(self, x):
        return self.all_modules(x)


class ConvStack(nn.Module):
    """``n`` ConvNormAct blocks in ``convs``; the first one carries the stride."""

    def __init__(self, n, cin, cout, kernel, stride, bias, norm_kw, nonlin_kw):
        super().__init__()
        self.convs = nn.Sequential(*[
            ConvNormAct(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, bias,
                        norm_kw, nonlin_kw) for i in range(n)])

    def forward(self, x):
        return self.convs(x)


class ResBlock(nn.Module):
    """ResNet-D basic block: conv1 (strided) -> conv2 (no nonlin) + skip -> LeakyReLU.

    The skip is identity, or AvgPool3d(stride) when strided, then a bias-free 1x1x1 ConvNormAct
    when the channel count changes.
    """

    def __init__(self, cin, cout, kernel, stride, bias, norm_kw, nonlin_kw):
        super().__init__()
        stride = [stride] * 3 if isinstance(stride, int) else list(stride)
        self.conv1 = ConvNormAct(cin, cout, kernel, stride, bias, norm_kw, nonlin_kw)
        self.conv2 = ConvNormAct(cout, cout, kernel, 1, bias, norm_kw, None)
        self.nonlin2 = nn.LeakyReLU(**nonlin_kw)
        skip = []
        if any(s != 1 for s in stride):
            skip.append(nn.AvgPool3d(stride, stride))
        if cin != cout:
            skip.append(ConvNormAct(cin, cout, 1, 1, False, norm_kw, None))
        self.skip = nn.Sequential(*skip) if skip else nn.Identity()

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        out += self.skip(x)
        return self.nonlin2(out)


class ResStage(nn.Module):
    """``n`` ResBlocks in ``blocks``; the first one carries the stride."""

    def __init__(self, n, cin, cout, kernel, stride, bias, norm_kw, nonlin_kw):
        super().__init__()
        self.blocks = nn.Sequential(*[
            ResBlock(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, bias,
                     norm_kw, nonlin_kw) for i in range(n)])

    def forward(self, x):
        return self.blocks(x)


class Encoder(nn.Module):
    """Stem (one ConvNormAct, stride 1) then one ResStage per resolution; returns all skips."""

    def __init__(self, a: dict, input_channels: int):
        super().__init__()
        f, k, bias = a["features_per_stage"], a["kernel_sizes"], a["conv_bias"]
        nkw, akw = a["norm_op_kwargs"], a["nonlin_kwargs"]
        self.stem = ConvStack(1, input_channels, f[0], k[0], 1, bias, nkw, akw)
        self.stages = nn.Sequential(*[
            ResStage(a["n_blocks_per_stage"][s], f[max(s - 1, 0)], f[s], k[s], a["strides"][s],
                     bias, nkw, akw) for s in range(a["n_stages"])])

    def forward(self, x) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    """Transposed conv up, concat the skip, ConvStack; 1x1x1 seg layer per stage (last one used).

    Holds a reference to the encoder (registered, as DNA does) so the state dict carries the
    ``decoder.encoder.*`` aliases.
    """

    def __init__(self, encoder: Encoder, a: dict, num_classes: int):
        super().__init__()
        self.encoder = encoder
        f, bias = a["features_per_stage"], a["conv_bias"]
        stages, ups, segs = [], [], []
        for s in range(1, a["n_stages"]):
            below, skip, stride = f[-s], f[-(s + 1)], a["strides"][-s]
            ups.append(ConvTranspose3d(below, skip, stride, stride, bias=bias))
            stages.append(ConvStack(a["n_conv_per_stage_decoder"][s - 1], 2 * skip, skip,
                                    a["kernel_sizes"][-(s + 1)], 1, bias, a["norm_op_kwargs"],
                                    a["nonlin_kwargs"]))
            segs.append(Conv3d(skip, num_classes, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.transpconvs = nn.ModuleList(ups)
        self.seg_layers = nn.ModuleList(segs)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        x = skips[-1]
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), 1))
        return self.seg_layers[-1](x)


class ResidualEncoderUNet(nn.Module):
    """Residual-encoder U-Net (nnU-Net ResEnc), deep supervision off.

    forward: x (B, input_channels, Z, Y, X) float, each spatial size divisible by the product of
    the strides along that axis -> logits (B, num_classes, Z, Y, X).
    """

    def __init__(self, arch: dict, input_channels: int, num_classes: int):
        super().__init__()
        self.arch = normalize_arch(arch)
        self.input_channels = int(input_channels)
        self.num_classes = int(num_classes)
        self.encoder = Encoder(self.arch, self.input_channels)
        self.decoder = Decoder(self.encoder, self.arch, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def build_network(arch_kwargs: dict, input_channels: int, num_classes: int) -> ResidualEncoderUNet:
    """Build the network from an architecture block (see normalize_arch). Parameters are freshly
    initialised (or meta tensors inside ``with torch.device('meta')``)."""
    return ResidualEncoderUNet(copy.deepcopy(arch_kwargs), input_channels, num_classes)
