"""Building a run from its config: the choices ``auto`` and ``--compile`` make on GPUs, decided here on the CPU."""

import pytest
import torch
from torch import nn

import fastclr.device
from fastclr.train.build import (
    build_model,
    compile_skip_reason,
    describe_precision,
    resolve_precision,
    wrap_model,
)
from fastclr.train.config import PretrainConfig
from fastclr.train.dist import DistInfo
from fastclr.train.monitor import describe

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
GPU = torch.device("cuda", 0)


@pytest.mark.parametrize(
    "capability,expected",
    [
        ((6, 0), (torch.float16, True)),  # P100
        ((7, 0), (torch.float16, True)),  # V100
        ((7, 5), (torch.float16, True)),  # T4
        ((8, 0), (torch.bfloat16, False)),  # A100
        ((9, 0), (torch.bfloat16, False)),  # H100
    ],
)
def test_precision_auto_uses_fp16_with_a_scaler_where_bf16_is_emulated(
    monkeypatch, capability, expected
):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", GPU) == expected
    assert describe_precision("auto", GPU).startswith(
        "fp16 autocast + GradScaler (GPU of compute" if expected[1] else "bf16 autocast (GPU of"
    )
    # an explicit choice is kept, emulated or not
    assert resolve_precision("bf16", GPU) == (torch.bfloat16, False)


@pytest.mark.parametrize(
    "native,expected,why",
    [
        (True, (torch.bfloat16, False), "bf16 autocast (this CPU computes bf16 natively"),
        (False, (None, False), "fp32 (a CPU without native bf16"),
    ],
)
def test_precision_auto_on_cpus_is_bf16_where_the_cpu_computes_it(
    monkeypatch, native, expected, why
):
    """AVX512-BF16/AMX run a bf16 cnn7 step ~2.7x faster than fp32; without them bf16 is emulated and slower."""
    monkeypatch.setattr(fastclr.device, "native_cpu_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == expected
    assert describe_precision("auto", cpu).startswith(why)
    # explicit choices never depend on the CPU
    assert resolve_precision("fp32", cpu) == (None, False)
    assert resolve_precision("bf16", cpu) == (torch.bfloat16, False)
    assert describe_precision("fp32", cpu) == "fp32 (as given)"
    # other devices (the meta device stands in for a GPU's in tests) never autocast
    assert resolve_precision("auto", torch.device("meta")) == (None, False)


def _cnn7(compile: bool) -> PretrainConfig:
    cfg = PretrainConfig()
    cfg.model.arch, cfg.model.width, cfg.model.proj_dim = "cnn7", 4, 8
    cfg.run.compile = compile
    return cfg


@pytest.fixture
def compiled(monkeypatch) -> list:
    """The modules handed to ``torch.compile`` (which returns them unchanged here)."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: seen.append(module) or module)
    return seen


def test_compile_compiles_a_batchnorm_model(compiled):
    model = build_model(_cnn7(compile=True), CPU)
    assert wrap_model(model, _cnn7(compile=True), CPU) is model and compiled == [model]
    assert compile_skip_reason(model) is None
    compiled.clear()
    wrap_model(model, _cnn7(compile=False), CPU)
    assert compiled == []


def test_compile_skips_a_sync_batchnorm_model_with_a_one_line_notice(compiled):
    """Dynamo graph-breaks at every SyncBatchNorm (the multi-GPU model), so such a model stays eager."""
    cfg = _cnn7(compile=True)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(build_model(cfg, CPU))
    assert wrap_model(model, cfg, CPU) is model and compiled == []
    notice = compile_skip_reason(model)
    assert notice.startswith("--compile skipped: ") and "SyncBatchNorm" in notice
    assert "\n" not in notice and torch.__version__ in notice

    class Loader(list):
        num_samples = 64

    printed = describe(cfg, CPU, Loader([None] * 4), model).splitlines()
    assert notice in printed
    plain = build_model(cfg, CPU)
    assert not any("--compile" in line for line in describe(cfg, CPU, Loader(), plain).splitlines())


def test_train_loader_refuses_a_flat_folder_only_when_the_knn_monitor_needs_labels(tmp_path):
    from PIL import Image

    from fastclr.train.build import build_train_loader
    from fastclr.train.config import ConfigError

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(8):
        Image.new("RGB", (20, 20), (30 * i, 0, 0)).save(flat / f"{i}.jpg")
    cfg = _cnn7(compile=False)
    cfg.data.data, cfg.data.size, cfg.data.workers, cfg.data.backend = str(flat), 16, 1, "torch"
    cfg.optim.batch_size = 4
    loader = build_train_loader(
        cfg, CPU, torch.float32
    )  # pretraining alone reads unlabelled images
    assert not loader.labelled and len(loader) == 2
    loader.close()
    cfg.data.test_data = str(tmp_path / "test")
    with pytest.raises(
        ConfigError, match=r"kNN monitor.*--data .*flat is a flat folder of unlabelled images"
    ):
        build_train_loader(cfg, CPU, torch.float32)
