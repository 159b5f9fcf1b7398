"""SimCLR models: backbones (torchvision ResNets, a small CNN) and the projection head."""

from fastclr.models.head import ProjectionHead, SimCLRClassifier, SimCLRModel, head_layers
from fastclr.models.resnet import ARCHS, CNN7, build_backbone, standard_width

__all__ = [
    "ARCHS",
    "CNN7",
    "ProjectionHead",
    "SimCLRClassifier",
    "SimCLRModel",
    "build_backbone",
    "head_layers",
    "standard_width",
]
