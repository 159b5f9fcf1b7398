"""The DALI loaders' graphs for a GPU, defined without one: once data is on the GPU it stays there.

DALI defines a pipeline's graph when the pipeline object is made; only ``build()`` needs CUDA. So
these tests give the loaders a CUDA device (``resolve_device`` patched), define each loader's graph
in a pipeline for GPU 0 and walk it from the outputs back to the file reader. Data leaves the GPU
wherever a GPU operator's output is read on the CPU: through ``.cpu()``, as a named argument (DALI
takes those from the CPU) or by a CPU operator; each is a device-to-host copy, and a sync, in
every batch.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from fastclr.pipelines import EvalLoader, SimCLRLoader, dali_available

pytestmark = [
    pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not importable"),
    pytest.mark.timeout(120),
]


def _edges(op):
    """The data nodes an operator instance reads: its inputs and its named argument inputs."""
    for edge in op.inputs:
        yield from edge if isinstance(edge, list) else [edge]


def _runs_on(op) -> str:
    return "gpu" if any(out.device == "gpu" for out in op.outputs) else "cpu"


def operators(outputs) -> list:
    """Every operator instance behind ``outputs``, each once."""
    seen, stack, ops = set(), [node.source for node in outputs], []
    while stack:
        op = stack.pop()
        if id(op) not in seen:
            seen.add(id(op))
            ops.append(op)
            stack.extend(edge.source for edge in _edges(op))
    return ops


def gpu_to_host(outputs) -> list[str]:
    """Each edge behind ``outputs`` on which data leaves the GPU, as ``"producer -> consumer"``."""
    found = []
    for op in operators(outputs):
        for edge in _edges(op):
            made_on = edge.source.outputs[edge.index].device
            if made_on == "gpu" and (edge.device == "cpu" or _runs_on(op) == "cpu"):
                found.append(f"{edge.source.name} -> {op.name}")
    return found


def gpu_graph(define, batch_size=4) -> list:
    """The outputs of ``define()``, defined (not built) in a pipeline for GPU 0 with conditionals."""
    from nvidia.dali import pipeline_def

    outputs = []

    @pipeline_def(enable_conditionals=True)
    def pipeline():
        outputs.extend(define())
        return tuple(outputs)

    pipeline(batch_size=batch_size, num_threads=1, device_id=0, seed=0)
    return outputs


def loader_graph(loader) -> list:
    """The outputs of the loader's graph (:meth:`_graph`) over its files, for GPU 0."""
    from nvidia.dali import fn

    def define():
        jpegs, labels = fn.readers.file(files=loader.files, labels=loader.labels)
        return loader._graph(jpegs, labels)

    return gpu_graph(define, loader.batch_size)


@pytest.fixture
def cuda_loaders(monkeypatch):
    """Loaders believe they run on cuda:0 (nothing here builds or runs a pipeline)."""
    monkeypatch.setattr(
        "fastclr.pipelines.base.resolve_device", lambda *args: torch.device("cuda", 0)
    )


@pytest.fixture
def jpegs(tmp_path):
    for i in range(4):
        folder = tmp_path / f"c{i % 2}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.jpg")
    return tmp_path


# Every op of the view on (solarize too), at a size where blur is on, colour jitter always.
EVERY_OP = dict(color_p=1.0, gray_p=0.5, blur_p=0.5, solarize_p=0.5)
LOADERS = {
    "simclr": lambda root: SimCLRLoader(root, 4, 224, device="gpu", **EVERY_OP),
    "simclr-labels": lambda root: SimCLRLoader(root, 4, 224, device="gpu", labels=True, **EVERY_OP),
    "eval": lambda root: EvalLoader(root, 4, 224, device="gpu"),
    "eval-augment": lambda root: EvalLoader(root, 4, 224, device="gpu", augment=True),
}


@pytest.mark.parametrize("make", LOADERS.values(), ids=LOADERS.keys())
def test_no_data_leaves_the_gpu(make, cuda_loaders, jpegs):
    loader = make(jpegs)
    assert loader.device.type == "cuda" and getattr(loader, "augment_impl", "dali") == "dali"
    outputs = loader_graph(loader)
    ops = operators(outputs)
    assert all(node.device == "gpu" for node in outputs)
    assert sum(_runs_on(op) == "gpu" for op in ops) >= 3  # decoder, resize, crop_mirror_normalize
    assert gpu_to_host(outputs) == []


def test_the_check_finds_a_named_argument_read_from_the_gpu():
    """The check itself: contrast with its centre copied to the host (a named argument) is found."""
    from nvidia.dali import fn, types

    def define():
        img = fn.random.uniform(range=[0, 255], shape=[8, 8, 3], dtype=types.UINT8).gpu()
        luma = fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY)
        mean = fn.reductions.mean(luma)
        return (fn.contrast(img, contrast=1.5, contrast_center=mean.cpu()),)

    (found,) = gpu_to_host(gpu_graph(define))
    assert "Mean" in found and "Contrast" in found, found
