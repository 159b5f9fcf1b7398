"""The torchvision backend: :class:`TorchSimCLRLoader` and :class:`TorchEvalLoader`, the DALI
loaders' twins, and the transforms they are built from."""

from fastclr.pipelines.torchvision.loader import TorchEvalLoader, TorchSimCLRLoader
from fastclr.pipelines.torchvision.transforms import EvalTransform, SimCLRTransform

__all__ = ["EvalTransform", "SimCLRTransform", "TorchEvalLoader", "TorchSimCLRLoader"]
