"""The MedMNIST ResNet baselines (model/resnet.py) and the 2D -> 2.5D / 3D / ACS converters (model/convert.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import MODELS, build_model, count_parameters, executed_parameter_count
from model.convert import ACSConv, acs_kernels, acs_split, convert_2d_to_3d, convert_conv2d, inflate_weight
from model.resnet import ResNetConfig, resnet2d

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["resnet18_2.5d", "resnet18_3d", "resnet18_acs", "resnet50_2.5d", "resnet50_3d", "resnet50_acs"]

# one input channel, two classes, width 64 (the MedMNIST reference setting); the rounded targets
# are 11.17 M / 33.14 M (ResNet-18 2.5D, ACS / 3D) and 23.50 M / 46.14 M (ResNet-50)
EXPECTED = {"resnet18_2.5d": 11_168_706, "resnet18_acs": 11_168_706, "resnet18_3d": 33_140_802,
            "resnet50_2.5d": 23_503_298, "resnet50_acs": 23_503_298, "resnet50_3d": 46_138_946}
ROUNDED = {"resnet18_2.5d": 11.17, "resnet18_acs": 11.17, "resnet18_3d": 33.14,
           "resnet50_2.5d": 23.50, "resnet50_acs": 23.50, "resnet50_3d": 46.14}


def _build(name, width=8, in_channels=1, num_classes=2, input_size=28):
    return build_model(name, in_channels=in_channels, num_classes=num_classes, input_size=input_size, width=width)


# ----------------------------------------------------------------------------------------------------------
# registry and parameter counts
# ----------------------------------------------------------------------------------------------------------

def test_registered_with_one_shared_config():
    for name in NAMES:
        assert name in MODELS
        assert MODELS[name].config_cls is ResNetConfig
        assert MODELS[name].help
    assert ResNetConfig().width == 64


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_at_width_64(name):
    model = _build(name, width=64)
    n = count_parameters(model)
    assert n == EXPECTED[name]
    assert round(n / 1e6, 2) == ROUNDED[name]


def test_2d_network_has_the_counts_of_2p5d_and_acs():
    assert count_parameters(resnet2d("resnet18", 1, 2, 64)) == EXPECTED["resnet18_2.5d"]
    assert count_parameters(resnet2d("resnet50", 1, 2, 64)) == EXPECTED["resnet50_2.5d"]


def test_tiny_forward_at_full_width():
    model = _build("resnet18_acs", width=64, input_size=8).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 8, 8, 8))
    assert out.shape == (1, 2)


def test_architecture_is_cifar_style():
    model = _build("resnet18_3d", width=64)
    assert model.conv1.kernel_size == (3, 3, 3) and model.conv1.stride == (1, 1, 1) and model.conv1.bias is None
    assert not any(isinstance(m, (nn.MaxPool3d, nn.MaxPool2d)) for m in model.modules())
    assert [s[0].conv1.stride[0] for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == [1, 2, 2, 2]
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == [2, 2, 2, 2]
    r50 = _build("resnet50_2.5d", width=64)
    assert [len(s) for s in (r50.layer1, r50.layer2, r50.layer3, r50.layer4)] == [3, 4, 6, 3]
    block = r50.layer2[0]  # stride on the 3x3 conv of the bottleneck, projection shortcut
    assert block.conv1.stride == (1, 1, 1) and block.conv2.stride == (2, 2, 2)
    assert block.conv3.out_channels == 512 and isinstance(block.shortcut[0], nn.Conv3d)
    assert r50.fc.in_features == 2048
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d)) for m in r50.modules())


# ----------------------------------------------------------------------------------------------------------
# forward / backward
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [28, 64])
def test_forward_shapes(name, size):
    model = _build(name, width=4, in_channels=1, num_classes=3, input_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, size, size, size))
    assert out.shape == (2, 3) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = _build(name, width=8, in_channels=3, num_classes=2)
    model.train()
    out = model(torch.randn(2, 3, 28, 28, 28))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert executed_parameter_count(model, torch.randn(2, 3, 16, 16, 16)) == count_parameters(model)


# ----------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------

def test_acs_split():
    assert acs_split(64) == (22, 21, 21)
    assert acs_split(128) == (43, 43, 42)
    assert acs_split(8) == (3, 3, 2)
    assert acs_split(10) == (4, 3, 3)
    assert acs_split(9) == (3, 3, 3)
    assert acs_split(2) == (1, 1, 0)
    for n in range(0, 50):
        split = acs_split(n)
        assert sum(split) == n and max(split) - min(split) <= 1 and list(split) == sorted(split, reverse=True)


@pytest.mark.parametrize("out_channels,split", [(64, (22, 21, 21)), (10, (4, 3, 3))])
def test_acs_kernel_shapes(out_channels, split):
    w = torch.randn(out_channels, 5, 3, 3)
    ka, kc, ks = acs_kernels(w)
    assert ka.shape == (split[0], 5, 1, 3, 3)
    assert kc.shape == (split[1], 5, 3, 1, 3)
    assert ks.shape == (split[2], 5, 3, 3, 1)
    assert torch.equal(torch.cat([ka[:, :, 0], kc[:, :, :, 0], ks[..., 0]]), w)


def test_acs_in_the_network_keeps_the_2d_kernels():
    model = _build("resnet18_acs", width=10)
    assert isinstance(model.conv1, ACSConv) and model.conv1.weight.shape == (10, 1, 3, 3)
    assert model.conv1.split == (4, 3, 3)
    assert model.layer2[0].conv1.split == acs_split(20) == (7, 7, 6)
    assert model.layer4[1].conv2.split == acs_split(80) == (27, 27, 26)


def test_acs_groups_convolve_along_their_planes():
    torch.manual_seed(0)
    conv2d = nn.Conv2d(3, 7, 3, padding=1, bias=True)
    acs = convert_conv2d(conv2d, "acs")
    x = torch.randn(2, 3, 5, 6, 4)
    with torch.no_grad():
        out = acs(x)
        a, c, s = acs.split
        assert out.shape == (2, 7, 5, 6, 4)
        w, b = conv2d.weight, conv2d.bias
        # axial group: the 2D conv on every D-slice (plane H-W)
        for d in range(5):
            ref = F.conv2d(x[:, :, d], w[:a], b[:a], padding=1)
            torch.testing.assert_close(out[:, :a, d], ref)
        # coronal group: the 2D conv on every H-slice (plane D-W)
        for h in range(6):
            ref = F.conv2d(x[:, :, :, h], w[a:a + c], b[a:a + c], padding=1)
            torch.testing.assert_close(out[:, a:a + c, :, h], ref)
        # sagittal group: the 2D conv on every W-slice (plane D-H)
        for k in range(4):
            ref = F.conv2d(x[..., k], w[a + c:], b[a + c:], padding=1)
            torch.testing.assert_close(out[:, a + c:, ..., k], ref)


def test_acs_strided_and_pointwise():
    conv = nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False)
    acs = convert_conv2d(conv, "acs")
    assert acs(torch.randn(1, 4, 9, 9, 9)).shape == (1, 5, 5, 5, 5)
    point = nn.Conv2d(4, 5, 1, stride=2, bias=False)
    acs1 = convert_conv2d(point, "acs")
    x = torch.randn(1, 4, 6, 6, 6)
    ref = F.conv3d(x, point.weight[:, :, None], stride=2)
    torch.testing.assert_close(acs1(x), ref)


def test_2p5d_and_3d_kernel_shapes():
    m25 = _build("resnet18_2.5d", width=8)
    m3 = _build("resnet18_3d", width=8)
    assert m25.conv1.weight.shape == (8, 1, 1, 3, 3) and m25.conv1.padding == (0, 1, 1)
    assert m3.conv1.weight.shape == (8, 1, 3, 3, 3) and m3.conv1.padding == (1, 1, 1)
    assert m25.layer2[0].conv1.stride == (2, 2, 2) and m3.layer2[0].conv1.stride == (2, 2, 2)
    assert m25.layer2[0].shortcut[0].weight.shape == (16, 8, 1, 1, 1)
    assert m3.layer2[0].shortcut[0].weight.shape == (16, 8, 1, 1, 1)
    r50 = _build("resnet50_3d", width=8)
    assert r50.layer1[0].conv1.weight.shape == (8, 8, 1, 1, 1)
    assert r50.layer1[0].conv2.weight.shape == (8, 8, 3, 3, 3)
    assert r50.layer1[0].conv3.weight.shape == (32, 8, 1, 1, 1)


def test_inflation():
    w = torch.randn(6, 4, 3, 3)
    w3 = inflate_weight(w, "3d")
    assert w3.shape == (6, 4, 3, 3, 3)
    torch.testing.assert_close(w3, torch.stack([w, w, w], dim=2) / 3)
    torch.testing.assert_close(w3.sum(2), w)
    w5 = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(inflate_weight(w5, "3d"), w5[:, :, None].expand(2, 3, 5, 5, 5) / 5)
    assert torch.equal(inflate_weight(w, "2.5d"), w[:, :, None])
    assert torch.equal(inflate_weight(w, "acs"), w)
    with pytest.raises(ValueError):
        inflate_weight(w, "4d")


def test_inflated_3d_conv_on_a_depth_constant_volume_equals_the_2d_conv():
    torch.manual_seed(0)
    conv2d = nn.Conv2d(3, 5, 3, padding=1, bias=True)
    conv3d = convert_conv2d(conv2d, "3d")
    img = torch.randn(2, 3, 10, 10)
    vol = img[:, :, None].expand(2, 3, 6, 10, 10).contiguous()
    with torch.no_grad():
        ref = conv2d(img)
        out = conv3d(vol)
    # away from the zero-padded depth border every slice sees k identical slices: the 2D response
    for d in range(1, 5):
        torch.testing.assert_close(out[:, :, d], ref, atol=1e-5, rtol=1e-5)
    # a 2.5D conv gives the 2D response on every slice, border included
    conv25 = convert_conv2d(conv2d, "2.5d")
    with torch.no_grad():
        out25 = conv25(vol)
    for d in range(6):
        torch.testing.assert_close(out25[:, :, d], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["2.5d", "3d", "acs"])
def test_2d_initialisation_carries_over(mode):
    torch.manual_seed(123)
    net2d = resnet2d("resnet18", 1, 2, 8)
    torch.manual_seed(123)
    net = _build(f"resnet18_{mode}", width=8)
    convs2d = [m for m in net2d.modules() if isinstance(m, nn.Conv2d)]
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv3d, ACSConv))]
    assert len(convs2d) == len(convs) > 0
    for c2, c3 in zip(convs2d, convs):
        torch.testing.assert_close(c3.weight, inflate_weight(c2.weight, mode))
    # torchvision-style init: Kaiming normal fan-out convolutions, BN weight 1 and bias 0
    std = net2d.layer3[0].conv2.weight.std().item()
    assert abs(std - (2.0 / (9 * 32)) ** 0.5) < 0.2 * (2.0 / (9 * 32)) ** 0.5
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    torch.testing.assert_close(net.fc.weight, net2d.fc.weight)


def test_converter_copies_norm_statistics_and_converts_pools():
    bn = nn.BatchNorm2d(4, momentum=0.3, eps=1e-3)
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
        bn.running_mean.uniform_()
        bn.running_var.uniform_(1, 2)
    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), bn, nn.MaxPool2d(2), nn.AvgPool2d(2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    out = convert_2d_to_3d(seq, "3d")
    assert isinstance(out[1], nn.BatchNorm3d) and out[1].eps == 1e-3 and out[1].momentum == 0.3
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(out[1], key), getattr(bn, key))
    assert isinstance(out[2], nn.MaxPool3d) and out[2].kernel_size == (2, 2, 2)
    assert isinstance(out[3], nn.AvgPool3d) and out[3].kernel_size == (2, 2, 2)
    assert isinstance(out[4], nn.AdaptiveAvgPool3d) and isinstance(out[6], nn.Linear)
    assert out(torch.randn(2, 1, 8, 8, 8)).shape == (2, 2)


# ----------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_config_delta_is_valid(name, tmp_path):
    """The delta alone (over an empty base) is accepted by the schema and sets the MedMNIST recipe."""
    from engine.config import load_config

    path = ROOT / "config" / "baselines" / f"{name}.json"
    raw = json.loads(path.read_text())
    assert raw["extends"] == "../base.json"
    (tmp_path / "baselines").mkdir()
    shutil.copy(path, tmp_path / "baselines" / path.name)
    (tmp_path / "base.json").write_text("{}")
    cfg = load_config(tmp_path / "baselines" / path.name)
    _check_recipe(cfg, name)


@pytest.mark.parametrize("name", NAMES)
def test_config_loads(name):
    from engine.config import load_config

    if not (ROOT / "config" / "base.json").is_file():
        pytest.skip("config/base.json is not in the repository yet")
    cfg = load_config(f"config/baselines/{name}.json")
    _check_recipe(cfg, name)
    assert cfg.model.width == 64


def _check_recipe(cfg, name):
    assert cfg.model_name == name and isinstance(cfg.model, ResNetConfig)
    t = cfg.train
    assert (t.optimizer, t.lr, t.weight_decay, t.epochs, t.batch_size) == ("adam", 1e-3, 0.0, 100, 32)
    assert (t.scheduler, t.milestones, t.gamma) == ("multistep", [0.5, 0.75], 0.1)
