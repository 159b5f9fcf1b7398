"""SimCLR models: backbones (torchvision ResNets, a small CNN) and the projection head."""

from fastclr.models.head import ProjectionHead, SimCLRModel
from fastclr.models.resnet import ARCHS, CNN7, build_backbone, standard_width

__all__ = ["ARCHS", "CNN7", "ProjectionHead", "SimCLRModel", "build_backbone", "standard_width"]
