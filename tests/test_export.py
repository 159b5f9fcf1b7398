"""``fastclr export``: torch.save and safetensors files that load back bit for bit, with the line that loads them."""

import json

import pytest
import torch

from fastclr.cli import main
from fastclr.models import SimCLRModel, build_backbone
from fastclr.train.checkpoint import save_checkpoint
from fastclr.train.config import PretrainConfig

# (arch, cifar_stem, width): torchvision's own shapes, then three that only fastclr's builder reproduces
BACKBONES = [
    ("resnet18", False, None),
    ("resnet18", True, None),
    ("resnet18", False, 16),
    ("cnn7", True, 8),
]


def checkpoint(tmp_path, arch, cifar_stem, width):
    """A checkpoint whose weights and BN statistics are not the builder's initial ones (so loading is visible)."""
    cfg = PretrainConfig()
    cfg.model.arch, cfg.model.cifar_stem, cfg.model.width = arch, cifar_stem, width
    torch.manual_seed(1)
    model = SimCLRModel(arch, cifar_stem=cifar_stem, width=width)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t))
    state = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "model": model.state_dict(),
        "config": cfg.to_dict(),
    }
    return save_checkpoint(state, tmp_path / "ckpt"), model.backbone.state_dict()


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize(("arch", "cifar_stem", "width"), BACKBONES)
def test_export_round_trip_through_the_printed_line(tmp_path, capsys, fmt, arch, cifar_stem, width):
    ckpt, expected = checkpoint(tmp_path, arch, cifar_stem, width)
    out = tmp_path / f"backbone.{fmt}"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--format", fmt]) == 0
    printed = capsys.readouterr().out.splitlines()
    line = printed[-1]
    meta = json.loads((tmp_path / f"backbone.{fmt}.json").read_text())
    assert meta["load"] == line and meta["format"] == fmt
    assert (meta["arch"], meta["cifar_stem"]) == (arch, cifar_stem)
    assert meta["width"] == (width or {"resnet18": 64, "cnn7": 32}[arch])
    assert ("torchvision" in meta) == (arch != "cnn7" and not cifar_stem and width is None)

    scope: dict = {}
    exec(line, scope)  # the line a user copies: builds the backbone and loads the file, strictly
    loaded = scope["backbone"].state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key

    if fmt == "safetensors":
        from safetensors import safe_open

        with safe_open(out, "pt") as f:
            assert f.metadata()["arch"] == arch


def test_format_follows_the_suffix(tmp_path, capsys):
    ckpt, expected = checkpoint(tmp_path, "cnn7", True, 8)
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "b.safetensors")]) == 0
    assert "(safetensors)" in capsys.readouterr().out
    from safetensors.torch import load_file

    assert torch.equal(
        load_file(tmp_path / "b.safetensors")["features.0.weight"], expected["features.0.weight"]
    )


def test_standard_resnet_loads_into_torchvision(tmp_path, capsys):
    import torchvision

    ckpt, expected = checkpoint(tmp_path, "resnet18", False, None)
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "r18.pt")]) == 0
    resnet = torchvision.models.resnet18(weights=None)
    result = resnet.load_state_dict(
        torch.load(tmp_path / "r18.pt", weights_only=True), strict=False
    )
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    assert torch.equal(resnet.conv1.weight, expected["conv1.weight"])


def test_cifar_stem_does_not_load_into_torchvision_even_with_strict_false(tmp_path):
    """strict=False forgives the missing fc only; the CIFAR stem's 3x3 conv1 is a shape mismatch, hence the line."""
    import torchvision

    from fastclr.train.evaluate import export_backbone

    ckpt, _ = checkpoint(tmp_path, "resnet18", True, None)
    r = export_backbone(ckpt, tmp_path / "r18.pt")
    state = torch.load(r["out"], weights_only=True)
    with pytest.raises(RuntimeError, match="size mismatch for conv1.weight"):
        torchvision.models.resnet18(weights=None).load_state_dict(state, strict=False)
    build_backbone("resnet18", cifar_stem=True)[0].load_state_dict(state)
