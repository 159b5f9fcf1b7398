"""timm backbones (``--arch timm:<name>``): building, LARS exclusions, clear errors, pretraining and export.

timm is an optional extra: the tests that need it skip without it; the missing-timm error and ``import fastclr``
staying free of timm are checked either way.
"""

import copy
import json
import subprocess
import sys

import pytest
import torch
from test_trainer import make_image_folder
from torch import nn

from fastclr.models import build_backbone
from fastclr.models.resnet import channels_last_helps
from fastclr.models.timm_backbone import freeze_patch_embed, input_size_error, timm_create_call
from fastclr.optim.lars import lars_exclusions, lars_param_groups
from fastclr.train.config import ConfigError, PretrainConfig

VIT = "timm:vit_tiny_patch16_224"
# timm's own 0.3 M-parameter test ViT (patch 16, 64 wide, 6 blocks, built for 160 px): ViT-Tiny's 5.7 M weights take
# seconds to initialise on a CPU, several times per run and export.
RUN_VIT = "timm:test_vit"


def needs_timm():
    return pytest.importorskip("timm")


@pytest.fixture(scope="module")
def built():
    """``built(arch) -> (backbone, feat_dim)``, each arch built once per module (do not modify the backbones)."""
    needs_timm()
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            torch.manual_seed(0)
            cache[arch] = build_backbone(arch)
        return cache[arch]

    return get


def config(arch: str, **model) -> PretrainConfig:
    cfg = PretrainConfig()
    cfg.model.arch = arch
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Without timm


def test_import_fastclr_does_not_import_timm():
    code = (
        "import sys, fastclr, fastclr.models, fastclr.optim, fastclr.train.config, fastclr.train.build\n"
        "fastclr.models.build_backbone('cnn7', width=4)\n"
        "fastclr.train.config.PretrainConfig().validate()\n"
        "assert 'timm' not in sys.modules, 'timm was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_timm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    missing = r"--arch timm:vit_tiny_patch16_224 needs timm, which is not installed: pip install 'fastclr\[timm\]'"
    with pytest.raises(ConfigError, match=missing):
        config(VIT).validate()
    with pytest.raises(ImportError, match=missing):
        build_backbone(VIT)


# ----------------------------------------------------------------------------------------------------------------------
# Building


@pytest.mark.parametrize(
    ("arch", "feat_dim", "channels_last"),
    [(VIT, 192, False), ("timm:resnet18", 512, True), ("timm:convnext_atto", 320, True)],
)
def test_backbone_feature_width_and_layout(built, arch, feat_dim, channels_last):
    """feat_dim is read from the model and is what its forward returns, at 32 px crops too (a 2x2 ViT grid)."""
    backbone, dim = built(arch)
    assert dim == feat_dim
    assert channels_last_helps(backbone) is channels_last
    # the export's rebuild call: ViTs built for 224 px resample their position embedding to the crops fed
    name = arch.removeprefix("timm:")
    dynamic = ", dynamic_img_size=True" if arch == VIT else ""
    assert (
        timm_create_call(arch, backbone) == f"timm.create_model({name!r}, num_classes=0{dynamic})"
    )
    with torch.no_grad():
        assert backbone.eval()(torch.randn(2, 3, 32, 32)).shape == (2, feat_dim)


def test_vit_at_its_own_size_matches_the_plain_timm_model(built):
    """The resampled position embedding is the identity at the size the model was made for: the backbone computes
    exactly what ``timm.create_model(name, num_classes=0)`` does with the same weights."""
    timm = needs_timm()
    backbone, _ = built(VIT)
    assert backbone.dynamic_img_size
    # weight_init="skip": the weights come from the backbone, not from a second (slow) initialisation
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=0, weight_init="skip")
    assert not plain.dynamic_img_size
    plain.load_state_dict(backbone.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x), plain.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ({"arch": "timm:vit_smal_patch16_224"}, r"unknown timm model 'vit_smal_patch16_224'.*did you mean "
         r"timm:vit_small_patch16_224"),
        ({"arch": "timm:"}, r"unknown timm model ''"),
        ({"arch": "timm:resnet50.a1_in1k"}, r"without a pretrained tag \(timm:resnet50\)"),
        ({"arch": VIT, "width": 32}, r"--width and --cifar-stem apply to resnet18, .* only"),
        ({"arch": VIT, "cifar_stem": True}, r"--width and --cifar-stem apply to"),
        ({"arch": "resnet18", "freeze_patch_embed": True}, r"--freeze-patch-embed applies to timm ViTs"),
        ({"arch": "vit_small"}, r"unknown arch 'vit_small'; choose one of resnet18.*timm:<name>"),
    ],
)  # fmt: skip
def test_bad_arch_settings_are_config_errors(model, match):
    if model["arch"].startswith("timm:"):
        needs_timm()
    with pytest.raises(ConfigError, match=match):
        config(**model).validate()


def test_adamw_needs_an_explicit_lr():
    cfg = config("cnn7")
    cfg.optim.optimizer = "adamw"
    with pytest.raises(ConfigError, match="--optimizer adamw needs --lr"):
        cfg.validate()


def test_adamw_keeps_the_exclusions_and_maps_momentum_to_beta1():
    from fastclr.train.build import build_optimizer, simclr_model

    cfg = config("cnn7", width=4, proj_dim=8)
    o = cfg.optim
    o.optimizer, o.lr, o.lr_scaling, o.weight_decay, o.momentum = "adamw", 1e-3, "none", 0.1, 0.8
    cfg.validate()
    model = simclr_model(cfg.model)
    optimizer, _ = build_optimizer(cfg, model, steps_per_epoch=10)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, exclude = optimizer.param_groups
    assert (decay["weight_decay"], exclude["weight_decay"]) == (0.1, 0.0)
    assert decay["betas"] == (0.8, 0.999)
    assert {id(p) for p in exclude["params"]} == {
        id(p) for n, p in model.named_parameters() if n in lars_exclusions(model)
    }


def test_fixed_size_models_refuse_other_sizes():
    fixed = nn.Module()
    fixed.pretrained_cfg = {"fixed_input_size": True, "input_size": (3, 224, 224)}
    assert input_size_error(fixed, 224) is None
    assert "takes 224x224 px inputs only" in input_size_error(fixed, 32)
    assert "set --size 224" in input_size_error(fixed, 32)
    fixed.dynamic_img_size = True  # resamples its position embedding: any size
    assert input_size_error(fixed, 32) is None
    assert input_size_error(nn.Linear(2, 2), 32) is None  # not a timm model: no fixed size


def test_freeze_patch_embed_is_random_and_frozen(built):
    backbone = copy.deepcopy(built(VIT)[0])
    freeze_patch_embed(backbone)
    proj = backbone.patch_embed.proj
    bound = (6 / (3 * 16 * 16 + 192)) ** 0.5
    assert not proj.weight.requires_grad and not proj.bias.requires_grad
    assert proj.weight.abs().max() <= bound and proj.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(proj.bias) == 0
    optimised = {id(p) for group in lars_param_groups(backbone) for p in group["params"]}
    assert id(proj.weight) not in optimised and id(proj.bias) not in optimised
    assert id(backbone.blocks[0].attn.qkv.weight) in optimised
    with pytest.raises(ValueError, match="needs a patch-embedding model"):
        freeze_patch_embed(copy.deepcopy(built("timm:resnet18")[0]))


# ----------------------------------------------------------------------------------------------------------------------
# LARS exclusions


def _wrapped(backbone: nn.Module) -> nn.Module:
    """As in SimCLRModel: the backbone under ``backbone.``, a head beside it."""
    return nn.ModuleDict(
        {"backbone": backbone, "head": nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))}
    )


def _head_split():
    return {"head.1.weight", "head.1.bias", "head.0.bias"}, {"head.0.weight"}


def _check_split(model: nn.Module, excluded: set[str], decayed: set[str]) -> None:
    got = lars_exclusions(model)
    names = {n for n, _ in model.named_parameters()}
    assert excluded | decayed == names and not excluded & decayed
    assert got == excluded, (
        f"wrongly excluded: {sorted(got - excluded)}; wrongly decayed: {sorted(excluded - got)}"
    )
    decay, exclude = lars_param_groups(model, weight_decay=0.1)
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in exclude["params"]} == excluded
    assert exclude["lars_exclude"] is True and exclude["weight_decay"] == 0.0
    assert {by_id[id(p)] for p in decay["params"]} == decayed and decay["weight_decay"] == 0.1


def test_lars_exclusions_vit():
    """Position embedding (1, N, D), class and register tokens (1, k, D), LayerNorms and biases are excluded; the
    patch projection, attention and MLP weights are decayed and adapted."""
    timm = needs_timm()
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, reg_tokens=2, num_classes=0
    )
    assert timm is not None and vit.pos_embed.ndim == 3 and vit.reg_token.shape == (1, 2, 16)
    model = _wrapped(vit)
    head_excluded, head_decayed = _head_split()
    excluded = {
        "backbone.pos_embed",
        "backbone.cls_token",
        "backbone.reg_token",
        "backbone.patch_embed.proj.bias",
        "backbone.norm.weight",
        "backbone.norm.bias",
        *head_excluded,
    }
    decayed = {"backbone.patch_embed.proj.weight", *head_decayed}
    for i in range(2):
        b = f"backbone.blocks.{i}"
        excluded |= {
            f"{b}.{n}"
            for n in (
                "norm1.weight",
                "norm1.bias",
                "norm2.weight",
                "norm2.bias",
                "attn.qkv.bias",
                "attn.proj.bias",
                "mlp.fc1.bias",
                "mlp.fc2.bias",
            )
        }
        decayed |= {
            f"{b}.{n}"
            for n in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
        }
    _check_split(model, excluded, decayed)


def test_lars_exclusions_convnext():
    """LayerNorm(2d) scales and shifts, layer-scale gammas and biases excluded; the weights of every convolution
    (stem, depthwise, downsampling) and MLP linear layer decayed."""
    needs_timm()
    from timm.models.convnext import ConvNeXt

    net = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=0)
    model = _wrapped(net)
    assert net.stages[0].blocks[0].gamma.ndim == 1
    decayed = {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and name != "head.0"
    }
    head_excluded, head_decayed = _head_split()
    decayed |= head_decayed
    excluded = {n for n, _ in model.named_parameters()} - decayed
    assert {"backbone.stem.0.weight", "backbone.stages.1.downsample.1.weight"} <= decayed
    assert {"backbone.stages.0.blocks.0.norm.weight", "backbone.stem.1.bias"} <= excluded
    assert head_excluded <= excluded
    _check_split(model, excluded, decayed)


def test_lars_exclusions_swin_relative_position_tables():
    """Swin declares its 2-d relative-position bias tables free of weight decay, through timm's no_weight_decay()."""
    needs_timm()
    from timm.models.swin_transformer import SwinTransformer

    swin = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=8, depths=(1,), num_heads=(2,),
                           num_classes=0)  # fmt: skip
    table = "backbone.layers.0.blocks.0.attn.relative_position_bias_table"
    model = _wrapped(swin)
    assert dict(model.named_parameters())[table].ndim == 2
    got = lars_exclusions(model)
    assert table in got
    assert "backbone.layers.0.blocks.0.attn.qkv.weight" not in got
    assert "backbone.patch_embed.norm.weight" in got


# ----------------------------------------------------------------------------------------------------------------------
# Pretraining and export, end to end


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """Two AdamW steps of a frozen-patch ViT on 32 px crops (a 2x2 patch grid) through ``fastclr pretrain``."""
    needs_timm()
    from fastclr.cli import main
    from fastclr.train.checkpoint import list_checkpoints

    root = tmp_path_factory.mktemp("timm")
    data = make_image_folder(root / "train", classes=2, per_class=8)
    out = root / "run"
    argv = [
        "pretrain", "--data", str(data), "--arch", RUN_VIT, "--freeze-patch-embed", "--optimizer", "adamw",
        "--lr", "1e-3", "--lr-scaling", "none", "--weight-decay", "0.1", "--size", "32", "--workers", "1",
        "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--proj-dim", "16", "--proj-hidden", "32",
        "--knn-every", "0", "--no-progress", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    return list_checkpoints(out / "checkpoints")[-1]


def test_vit_pretrains_with_a_frozen_patch_projection(vit_run):
    from fastclr.train.build import simclr_model
    from fastclr.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(vit_run)
    assert ckpt["step"] == 2
    cfg = PretrainConfig.from_dict(ckpt["config"])
    torch.manual_seed(cfg.run.seed)  # as build_model draws the initial weights
    start = simclr_model(cfg.model).state_dict()
    trained = ckpt["model"]
    frozen = ("backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias")
    for key in frozen:
        assert torch.equal(trained[key], start[key]), key
    for key in (
        "backbone.blocks.0.attn.qkv.weight",
        "backbone.pos_embed",
        "backbone.cls_token",
        "head.0.weight",
    ):
        assert not torch.equal(trained[key], start[key]), key
    assert all(torch.isfinite(t).all() for t in trained.values() if t.is_floating_point())


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_export_loads_into_timm(vit_run, tmp_path, capsys, fmt):
    timm = needs_timm()
    from fastclr.cli import main
    from fastclr.train.evaluate import load_model

    out = tmp_path / f"vit.{fmt}"
    assert main(["export", "--ckpt", str(vit_run), "--out", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    meta = json.loads((tmp_path / f"vit.{fmt}.json").read_text())
    assert meta["load"] == line and meta["arch"] == RUN_VIT and meta["feat_dim"] == 64
    assert meta["timm"] == "timm.create_model('test_vit', num_classes=0).load_state_dict(...)"
    assert "torchvision" not in meta

    model, _ = load_model(vit_run)
    expected = model.backbone.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import load_file

        state = load_file(out)
    else:
        state = torch.load(out, weights_only=True)
    plain = timm.create_model("test_vit", num_classes=0)
    plain.load_state_dict(state)  # strict: same keys, same shapes
    for key, value in expected.items():
        assert torch.equal(plain.state_dict()[key], value), key

    scope: dict = {}
    # the printed line: timm.create_model(..., dynamic_img_size=True), then a strict load
    exec(line, scope)
    x = torch.randn(3, 3, 32, 32)  # the crop size it was trained at
    with torch.no_grad():
        torch.testing.assert_close(scope["backbone"].eval()(x), model.backbone(x), rtol=0, atol=0)


def test_vit_preset_holds_the_recipe():
    needs_timm()
    from fastclr.train.config_io import load_preset

    cfg = load_preset("vit-s16-imagenet")
    cfg.validate()
    assert cfg.model.arch == "timm:vit_small_patch16_224" and cfg.model.freeze_patch_embed
    o = cfg.optim
    assert (
        o.optimizer,
        o.lr,
        o.lr_scaling,
        o.weight_decay,
        o.batch_size,
        o.epochs,
        o.warmup_epochs,
    ) == ("adamw", 1.5e-4, "linear", 0.1, 4096, 300, 40.0)
    assert (cfg.loss.temperature, cfg.model.proj_hidden, cfg.model.proj_dim) == (0.2, 4096, 256)
