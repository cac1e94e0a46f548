"""infer.network against dynamic-network-architectures 0.4.4 (the reference nnU-Net network)."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from infer.network import ArchitectureError, build_network, normalize_arch
from tinymodel import IN_CHANNELS, NUM_CLASSES, TINY_PATCH, nninteractive_v1_arch, tiny_arch, tiny_network

unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")


def dna_network(arch: dict, num_classes=NUM_CLASSES):
    a = normalize_arch(arch)
    return unet.ResidualEncoderUNet(
        IN_CHANNELS, a["n_stages"], a["features_per_stage"], nn.Conv3d, a["kernel_sizes"],
        a["strides"], a["n_blocks_per_stage"], num_classes, a["n_conv_per_stage_decoder"],
        a["conv_bias"], nn.InstanceNorm3d, a["norm_op_kwargs"], None, None, nn.LeakyReLU,
        a["nonlin_kwargs"], deep_supervision=False)


def randomize(net, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return net.eval()


@pytest.mark.slow
def test_dna_state_dict_loads_strictly_into_ours_and_outputs_match():
    ref = randomize(dna_network(tiny_arch()), seed=1)
    ours = build_network(tiny_arch(), IN_CHANNELS, NUM_CLASSES).eval()
    ref_sd = ref.state_dict()
    assert list(ours.state_dict()) == list(ref_sd)  # same keys, same order
    assert any(".all_modules." in k for k in ref_sd) and any(k.startswith("decoder.encoder.") for k in ref_sd)
    ours.load_state_dict(ref_sd, strict=True)
    x = torch.randn(2, IN_CHANNELS, *TINY_PATCH, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert got.shape == (2, NUM_CLASSES, *TINY_PATCH)
    assert want.abs().max() > 1e-2  # a meaningful comparison, not two zero tensors
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_our_state_dict_loads_strictly_into_dna_and_outputs_match():
    ours = tiny_network(seed=3)
    ref = dna_network(tiny_arch()).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, IN_CHANNELS, *TINY_PATCH, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


def test_nninteractive_v1_architecture_matches_dna_key_for_key():
    with torch.device("meta"):
        ours = build_network(nninteractive_v1_arch(), IN_CHANNELS, NUM_CLASSES)
        ref = dna_network(nninteractive_v1_arch())
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters())
    # nnInteractive v1.0 (the ResEnc-L preset) is a 102 M-parameter network; dynamic-network-
    # architectures, the reference built above, counts the same number
    assert 101e6 < n_ours < 103e6
    assert ours_shapes["encoder.stem.convs.0.conv.weight"] == (32, 8, 3, 3, 3)
    assert ours_shapes["decoder.seg_layers.4.weight"] == (2, 32, 1, 1, 1)


def test_wrapped_and_bare_arch_blocks_build_the_same_network():
    bare = tiny_arch()
    wrapped = {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
               "arch_kwargs": dict(bare, conv_op="torch.nn.modules.conv.Conv3d",
                                   norm_op="torch.nn.modules.instancenorm.InstanceNorm3d",
                                   nonlin="torch.nn.LeakyReLU", dropout_op=None, dropout_op_kwargs=None),
               "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    assert normalize_arch(wrapped) == normalize_arch(bare)
    with torch.device("meta"):
        a = build_network(wrapped, IN_CHANNELS, NUM_CLASSES).state_dict()
        b = build_network(bare, IN_CHANNELS, NUM_CLASSES).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_scalar_entries_are_expanded_per_stage():
    a = normalize_arch(dict(tiny_arch(), kernel_sizes=3, strides=[1, 2, 2, 2], n_blocks_per_stage=1,
                            n_conv_per_stage_decoder=1))
    assert a["kernel_sizes"] == [[3, 3, 3]] * 4
    assert a["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert a["n_blocks_per_stage"] == [1, 1, 1, 1] and a["n_conv_per_stage_decoder"] == [1, 1, 1]


@pytest.mark.parametrize("change, words", [
    ({"norm_op": "torch.nn.modules.batchnorm.BatchNorm3d"}, "norm_op"),
    ({"conv_op": "torch.nn.Conv2d"}, "conv_op"),
    ({"nonlin": "os.system"}, "nonlin"),
    ({"dropout_op": "torch.nn.Dropout3d"}, "dropout_op"),
    ({"strides": [[1, 1, 1], [2, 2, 2]]}, "strides"),
    ({"kernel_sizes": [[3, 3]] * 4}, "kernel_sizes"),
    ({"strides": [[1, 1, 1], [1, 0, 2], [2, 2, 2], [2, 2, 2]]}, "strides must be >= 1"),
    ({"kernel_sizes": [[0, 3, 3]] * 4}, "kernel_sizes must be >= 1"),
    ({"features_per_stage": [4, 0, 16, 16]}, "features_per_stage must be >= 1"),
    ({"block": "BottleneckD"}, "block"),
])
def test_unsupported_architectures_are_refused_clearly(change, words):
    with pytest.raises(ArchitectureError, match=words):
        normalize_arch(dict(tiny_arch(), **change))


def test_wrong_network_class_is_refused():
    with pytest.raises(ArchitectureError, match="PlainConvUNet"):
        normalize_arch({"network_class_name": "x.PlainConvUNet", "arch_kwargs": tiny_arch()})


@pytest.mark.slow
def test_infer_imports_without_reference_packages():
    code = ("import sys\n"
            "for m in ('dynamic_network_architectures', 'nnunetv2', 'nnInteractive', 'nninteractive'):\n"
            "    sys.modules[m] = None\n"
            "import infer.network, infer.weights, infer.convert, infer.card\n"
            "import torch\n"
            "with torch.device('meta'):\n"
            "    infer.network.build_network(" + repr(tiny_arch()) + ", 8, 2)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(__import__("conftest").ROOT), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_meta_build_skips_random_init_but_cpu_build_keeps_it(monkeypatch):
    """On the meta device the network is only a shape for load_state_dict(assign=True): no random
    init runs there (torch 2.8's meta uniform_ imports sympy, which the CUDA 12 image leaves out).
    Built on the CPU, the convolutions are initialised as nn.Conv3d / nn.ConvTranspose3d are."""
    calls = []
    real = nn.init.kaiming_uniform_
    monkeypatch.setattr(nn.init, "kaiming_uniform_", lambda t, *a, **k: calls.append(t.device.type) or real(t, *a, **k))
    with torch.device("meta"):
        net = build_network(tiny_arch(), IN_CHANNELS, NUM_CLASSES)
    assert calls == []
    assert all(p.is_meta for p in net.parameters())
    net = build_network(tiny_arch(), IN_CHANNELS, NUM_CLASSES)
    n_convs = sum(isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) for m in net.modules())
    assert calls == ["cpu"] * n_convs and n_convs > 0
    assert all(p.abs().sum() > 0 for n, p in net.named_parameters() if n.endswith("conv.weight"))
