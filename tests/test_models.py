"""Backbones, projection head and the SimCLR model: shapes, initialisation, memory format, errors."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from fastclr.models import ARCHS, ProjectionHead, SimCLRModel, build_backbone

# Narrow widths keep every forward pass in milliseconds; the standard widths are checked by feat_dim.
TINY_WIDTH = {"resnet18": 8, "resnet34": 4, "resnet50": 4, "cnn7": 8}
STANDARD_FEAT_DIM = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "cnn7": 256}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cifar_stem, size", [(True, 16), (False, 32)])
def test_backbone_output_shape(arch, cifar_stem, size):
    width = TINY_WIDTH[arch]
    backbone, feat_dim = build_backbone(arch, cifar_stem=cifar_stem, width=width)
    expected_dim = width * (32 if arch == "resnet50" else 8)
    assert feat_dim == expected_dim
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, size, size))
    assert out.shape == (2, feat_dim)


@pytest.mark.parametrize("arch", ARCHS)
def test_standard_width_feat_dim(arch):
    _, feat_dim = build_backbone(arch)
    assert feat_dim == STANDARD_FEAT_DIM[arch]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("width", [8, 64])
def test_resnet_has_no_fc_and_zero_init_residual(arch, width):
    backbone, _ = build_backbone(arch, cifar_stem=True, width=width)
    assert isinstance(backbone.fc, nn.Identity)
    last_bns = [
        m.bn3 if isinstance(m, Bottleneck) else m.bn2
        for m in backbone.modules()
        if isinstance(m, BasicBlock | Bottleneck)
    ]
    assert len(last_bns) == (8 if arch == "resnet18" else 16)
    assert all(torch.count_nonzero(bn.weight) == 0 for bn in last_bns)
    # Only those: the other BNs start at gamma = 1, and convs are not zero.
    assert torch.all(backbone.bn1.weight == 1)
    assert torch.count_nonzero(backbone.conv1.weight) > 0


def test_cifar_stem_is_3x3_stride_1_without_maxpool():
    backbone, _ = build_backbone("resnet18", cifar_stem=True, width=8)
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, nn.Identity)
    imagenet, _ = build_backbone("resnet18", cifar_stem=False, width=8)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)


def test_standard_resnet_state_dict_loads_into_torchvision():
    backbone, _ = build_backbone("resnet18")
    plain = torchvision.models.resnet18(weights=None)
    plain.fc = nn.Identity()
    plain.load_state_dict(backbone.state_dict())  # strict: same names and shapes


@pytest.mark.parametrize("arch", ARCHS)
def test_channels_last_gives_the_same_result(arch):
    torch.manual_seed(0)
    model = SimCLRModel(arch, cifar_stem=True, width=TINY_WIDTH[arch], proj_hidden=32).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        h, z = model(x)
        model.to(memory_format=torch.channels_last)
        h_cl, z_cl = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(h_cl, h, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z_cl, z, atol=1e-5, rtol=1e-4)


def test_simclr_model_forward_and_backward():
    model = SimCLRModel("resnet18", cifar_stem=True, width=8, proj_dim=16)
    assert model.feat_dim == 64
    h, z = model(torch.randn(4, 3, 16, 16))
    assert h.shape == (4, 64) and z.shape == (4, 16)
    z.square().sum().backward()
    assert model.backbone.conv1.weight.grad is not None


@pytest.mark.parametrize(
    "num_layers, hidden, expected_linears",
    [(3, 32, [(64, 32), (32, 32), (32, 16)]), (2, None, [(64, 64), (64, 16)]), (1, 32, [(64, 16)])],
)
def test_projection_head_layout(num_layers, hidden, expected_linears):
    head = ProjectionHead(64, hidden_dim=hidden, out_dim=16, num_layers=num_layers)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == expected_linears
    assert linears[-1].bias is None
    assert isinstance(head[-1], nn.Linear)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head) == num_layers - 1
    assert sum(isinstance(m, nn.ReLU) for m in head) == num_layers - 1
    assert head(torch.randn(5, 64)).shape == (5, 16)


def test_v1_head_default_hidden_is_backbone_width():
    model = SimCLRModel("resnet50", cifar_stem=True, width=4, proj_layers=2)
    first = model.head[0]
    assert (first.in_features, first.out_features) == (128, 128)
    assert ProjectionHead(512)[0].out_features == 2048


def test_unknown_arch_names_the_choices():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50, cnn7"):
        build_backbone("vit_b16")
    with pytest.raises(ValueError, match="unknown arch 'resnet101'"):
        SimCLRModel("resnet101")


@pytest.mark.parametrize("width", [0, -8, 2.5])
def test_bad_width_raises(width):
    with pytest.raises(ValueError, match="width"):
        build_backbone("resnet18", width=width)


def test_bad_head_arguments_raise():
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(64, num_layers=0)
    with pytest.raises(ValueError, match="out_dim"):
        ProjectionHead(64, out_dim=0)
