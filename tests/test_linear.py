"""Linear evaluation on tiny synthetic data: it learns, and the frozen backbone never changes."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastclr.eval import linear_eval


def make_loaders(n_train=96, n_test=48, num_classes=3, seed=0):
    """Images whose per-channel mean encodes the class, plus noise."""
    gen = torch.Generator().manual_seed(seed)

    def split(n):
        labels = torch.arange(n) % num_classes
        means = torch.eye(num_classes, 3)[labels][:, :, None, None] * 2.0
        return TensorDataset(means + 0.5 * torch.randn(n, 3, 4, 4, generator=gen), labels)

    train = DataLoader(split(n_train), batch_size=16, shuffle=True, generator=gen)
    test = DataLoader(split(n_test), batch_size=16)
    return train, test


def make_backbone():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_linear_eval_learns_and_leaves_backbone_unchanged():
    train, test = make_loaders()
    backbone = make_backbone().train()
    before = snapshot(backbone)
    result = linear_eval(backbone, train, test, num_classes=3, epochs=8, lr=0.1, progress=False)
    assert set(result) >= {"top1", "top5"}
    assert result["top1"] > 0.9, result
    assert result["top5"] == 1.0  # top-min(5, 3) covers every class
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"
    # The caller's module comes back as it was handed over.
    assert backbone.training
    assert all(p.requires_grad for p in backbone.parameters())


def test_linear_eval_accuracy_reflects_the_features():
    # A backbone that discards the input: the classifier cannot beat chance on balanced classes.
    train, test = make_loaders()
    blind = nn.Sequential(nn.Flatten(), nn.Linear(48, 4))
    nn.init.zeros_(blind[1].weight)
    result = linear_eval(blind, train, test, num_classes=3, epochs=3, progress=False)
    assert result["top1"] == pytest.approx(1 / 3, abs=0.01)


def test_linear_eval_raises_when_the_backbone_changes(monkeypatch):
    train, test = make_loaders()
    backbone = make_backbone()
    # Sabotage: eval() becomes a no-op, so BatchNorm keeps updating its running statistics.
    monkeypatch.setattr(backbone, "eval", lambda: backbone)
    with pytest.raises(RuntimeError, match="modified the frozen backbone.*running_mean"):
        linear_eval(backbone, train, test, num_classes=3, epochs=1, progress=False)
    assert all(p.requires_grad for p in backbone.parameters())  # restored on the error path too


def test_linear_eval_raises_when_a_forward_hook_edits_weights():
    train, test = make_loaders()
    backbone = make_backbone()

    def tamper(module, inputs, output):
        with torch.no_grad():
            module.weight.add_(1e-3)

    backbone[0].register_forward_hook(tamper)
    with pytest.raises(RuntimeError, match=r"param 0\.weight"):
        linear_eval(backbone, train, test, num_classes=3, epochs=1, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 3, "epochs": 0}, "epochs"),
        ({"num_classes": 3, "lr": 0.0}, "lr"),
    ],
)
def test_linear_eval_rejects_bad_arguments(kwargs, match):
    train, test = make_loaders()
    with pytest.raises(ValueError, match=match):
        linear_eval(make_backbone(), train, test, progress=False, **kwargs)


def test_linear_eval_rejects_empty_loaders():
    train, test = make_loaders()
    with pytest.raises(ValueError, match="train_loader"):
        linear_eval(make_backbone(), [], test, num_classes=3, progress=False)
    with pytest.raises(ValueError, match="test_loader"):
        linear_eval(make_backbone(), train, [], num_classes=3, epochs=1, progress=False)
