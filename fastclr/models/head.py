"""SimCLR projection head and the backbone + head model."""

from __future__ import annotations

import torch
from torch import nn

from fastclr.models.resnet import build_backbone


class ProjectionHead(nn.Sequential):
    """SimCLR projection head g(.): ``(B, in_dim) -> (B, out_dim)``.

    ``num_layers - 1`` blocks of Linear-BN-ReLU, then a Linear without bias. The default 3 layers is
    SimCLR v2's head (Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised
    Learners"); ``num_layers=2`` with ``hidden_dim=in_dim=2048`` is the v1 paper's 2048->2048->128.

    Args:
        in_dim: backbone feature size.
        hidden_dim: width of the hidden layers; ``None`` means ``in_dim``.
        out_dim: embedding size (128 in SimCLR).
        num_layers: number of linear layers, >= 1.

    Example:
        >>> head = ProjectionHead(512, hidden_dim=None, num_layers=2)
        >>> head(torch.randn(4, 512)).shape
        torch.Size([4, 128])
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int | None = 2048,
        out_dim: int = 128,
        num_layers: int = 3,
    ) -> None:
        if hidden_dim is None:
            hidden_dim = in_dim
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            # No linear bias: the BN right after it has its own shift.
            layers += [
                nn.Linear(dim, hidden_dim, bias=False),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
            ]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=False))
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim


class SimCLRModel(nn.Module):
    """Backbone f(.) plus projection head g(.).

    Args:
        arch: backbone architecture, one of ``fastclr.models.ARCHS``.
        cifar_stem: 3x3 stride-1 stem without max-pool, for 32x32 images.
        width: backbone base width; ``None`` means the architecture's standard one.
        proj_layers: linear layers in the head (3: SimCLR v2, 2: v1).
        proj_hidden: head hidden width; ``None`` means the backbone's feature size.
        proj_dim: embedding size.

    Example:
        >>> model = SimCLRModel("resnet18", cifar_stem=True).to(memory_format=torch.channels_last)
        >>> h, z = model(torch.randn(8, 3, 32, 32).to(memory_format=torch.channels_last))
        >>> h.shape, z.shape
        (torch.Size([8, 512]), torch.Size([8, 128]))
    """

    def __init__(
        self,
        arch: str = "resnet18",
        cifar_stem: bool = False,
        width: int | None = None,
        proj_layers: int = 3,
        proj_hidden: int | None = None,
        proj_dim: int = 128,
    ) -> None:
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(arch, cifar_stem=cifar_stem, width=width)
        self.head = ProjectionHead(
            self.feat_dim, hidden_dim=proj_hidden, out_dim=proj_dim, num_layers=proj_layers
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, 3, H, W) -> (h (B, feat_dim), z (B, proj_dim))``; h is what evaluation uses."""
        h = self.backbone(x)
        return h, self.head(h)
