"""SimCLR projection head, the backbone + head model, and the classifier fine-tuned from its first head layers."""

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
        self.in_dim, self.out_dim, self.num_layers = in_dim, out_dim, num_layers


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


def head_layers(head: ProjectionHead, k: int) -> nn.Sequential:
    """The first ``k`` layers of a projection head, sharing its modules (and so its weights).

    Layer ``i < depth`` is ``Linear -> BN -> ReLU`` (three modules), the last one a bare ``Linear``; ``k = 0`` is an
    empty ``Sequential`` (the identity). SimCLR v2 fine-tunes from the output of layer ``k = 1`` (Chen et al. 2020b,
    section 2; google-research/simclr ``tf2/model.py`` ``ft_proj_selector``), v1 from the backbone (``k = 0``).

    Raises:
        ValueError: ``k`` outside ``[0, depth]``.
    """
    depth = head.num_layers
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= depth:
        raise ValueError(f"head layer must be an int in [0, {depth}] (the head's depth), got {k!r}")
    modules = list(head)
    return nn.Sequential(*(modules if k == depth else modules[: 3 * k]))


def head_width(head: ProjectionHead, k: int) -> int:
    """Width of the output of the first ``k`` layers of ``head``: the backbone's for ``k = 0``."""
    if k == 0:
        return head.in_dim
    return head.out_dim if k == head.num_layers else head[3 * (k - 1)].out_features


class SimCLRClassifier(nn.Module):
    """Backbone f(.), the first ``head_layers`` projection-head layers, and a linear classifier: the fine-tuned model.

    ``(B, 3, H, W) -> logits (B, num_classes)``. Parameter names are ``backbone.*`` and ``head.<i>.*`` as in
    :class:`SimCLRModel` (a pretrained state_dict's entries load as they are) plus ``fc.weight`` / ``fc.bias``.
    The classifier starts at zero, as the reference fine-tuning command sets (``--zero_init_logits_layer``): every
    class starts equally likely and the first steps move only it. With ``num_classes=None`` there is no classifier
    (``fc`` is the identity): the encoder ``backbone + head[:k]`` alone, as ``fastclr export --with-head K`` writes it.

    Args:
        arch, cifar_stem, width: the backbone, as for :class:`SimCLRModel`.
        num_classes: classes of the linear layer, or None for none.
        head_layers: projection-head layers kept, ``0 <= head_layers <= proj_layers``.
        proj_layers, proj_hidden, proj_dim: the pretrained head's shape, as for :class:`SimCLRModel`.

    Example:
        >>> model = SimCLRClassifier("cnn7", num_classes=10, cifar_stem=True, width=8, head_layers=1)
        >>> model(torch.randn(4, 3, 32, 32)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int | None = 1000,
        *,
        cifar_stem: bool = False,
        width: int | None = None,
        head_layers: int = 1,
        proj_layers: int = 3,
        proj_hidden: int | None = None,
        proj_dim: int = 128,
    ) -> None:
        super().__init__()
        simclr = SimCLRModel(
            arch,
            cifar_stem=cifar_stem,
            width=width,
            proj_layers=proj_layers,
            proj_hidden=proj_hidden,
            proj_dim=proj_dim,
        )
        self._attach(simclr, head_layers, num_classes)

    def _attach(self, simclr: SimCLRModel, k: int, num_classes: int | None) -> None:
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise ValueError(f"num_classes must be an int >= 2 or None, got {num_classes!r}")
        self.backbone, self.head = simclr.backbone, head_layers(simclr.head, k)
        self.head_layers, self.num_classes = k, num_classes
        self.feat_dim = head_width(simclr.head, k)
        if num_classes is None:
            self.fc = nn.Identity()
        else:
            self.fc = nn.Linear(self.feat_dim, num_classes)
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    @classmethod
    def from_pretrained(
        cls, simclr: SimCLRModel, head_layers: int, num_classes: int | None
    ) -> SimCLRClassifier:
        """The classifier on top of a (pretrained) SimCLR model's backbone and first ``head_layers`` head layers.

        The modules are ``simclr``'s own, not copies: the weights they hold are the pretrained ones.
        """
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._attach(simclr, head_layers, num_classes)
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, 3, H, W) -> logits (B, num_classes)`` (features ``(B, feat_dim)`` without a classifier)."""
        return self.fc(self.head(self.backbone(x)))
