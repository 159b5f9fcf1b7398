"""LARS against a NumPy transcription of the official SimCLR update; the param-group helper."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fastclr.optim import LARS, lars_param_groups


def numpy_lars_step(w, g, v, lr, momentum, wd, eta, exclude):
    """One step of google-research/simclr's LARSOptimizer for one variable, in float64."""
    if exclude:
        v_new = momentum * v + lr * g
    else:
        g = g + wd * w
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        trust = eta * w_norm / g_norm if (w_norm > 0 and g_norm > 0) else 1.0
        v_new = momentum * v + lr * trust * g
    return w - v_new, v_new


def assert_close(actual, expected, what, atol=1e-12, rtol=1e-10):
    err = np.abs(actual - expected)
    bad = err > atol + rtol * np.abs(expected)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{err.size} elements differ; max abs err {err.max():.3e}; "
        f"first at {np.argwhere(bad)[0]}: got {actual[bad][0]!r}, expected {expected[bad][0]!r}"
    )


CASES = {
    # name: (initial weight, excluded?)
    "conv weight": (lambda rng: rng.standard_normal((4, 3, 3, 3)), False),
    "linear weight": (lambda rng: rng.standard_normal((5, 7)), False),
    "zero weight": (lambda rng: np.zeros((3, 3)), False),  # ||w|| = 0 -> trust 1
    "zero grad": (lambda rng: rng.standard_normal((6,)), False),  # ||g'|| = 0 with wd = 0
    "bias excluded": (lambda rng: rng.standard_normal((7,)), True),
}


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_lars_matches_numpy_over_steps(momentum, wd):
    rng = np.random.default_rng(0)
    lr, eta, steps = 0.7, 0.001, 5
    init = {name: make(rng) for name, (make, _) in CASES.items()}
    params = {
        name: torch.tensor(w, dtype=torch.float64, requires_grad=True) for name, w in init.items()
    }
    groups = [{"params": [params[n]], "lars_exclude": exclude} for n, (_, exclude) in CASES.items()]
    opt = LARS(groups, lr=lr, momentum=momentum, weight_decay=wd, eta=eta)
    ref_w = {n: w.copy() for n, w in init.items()}
    ref_v = {n: np.zeros_like(w) for n, w in init.items()}
    for step in range(steps):
        for name, p in params.items():
            g = np.zeros_like(init[name]) if name == "zero grad" else rng.standard_normal(p.shape)
            p.grad = torch.tensor(g)
            ref_w[name], ref_v[name] = numpy_lars_step(
                ref_w[name], g, ref_v[name], lr, momentum, wd, eta, CASES[name][1]
            )
        opt.step()
        for name, p in params.items():
            assert_close(p.detach().numpy(), ref_w[name], f"{name} after step {step + 1}")
    if momentum > 0:
        for name, p in params.items():
            assert_close(opt.state[p]["momentum_buffer"].numpy(), ref_v[name], f"{name} buffer")


def test_trust_ratio_scales_the_step():
    """A large gradient on a small weight moves it by about eta * ||w|| * lr, not by lr * ||g||."""
    w = torch.full((10,), 0.1, dtype=torch.float64, requires_grad=True)
    w.grad = torch.full((10,), 100.0, dtype=torch.float64)
    LARS([w], lr=1.0, momentum=0.0, weight_decay=0.0, eta=0.001).step()
    step_norm = torch.linalg.vector_norm(w.detach() - 0.1).item()
    assert step_norm == pytest.approx(0.001 * np.sqrt(10) * 0.1, rel=1e-9)


def test_excluded_group_has_no_weight_decay_and_no_adaptation():
    w = torch.tensor([2.0, -1.0], requires_grad=True)
    w.grad = torch.tensor([0.5, 0.25])
    LARS([{"params": [w], "lars_exclude": True}], lr=0.1, momentum=0.9, weight_decay=0.5).step()
    torch.testing.assert_close(w.detach(), torch.tensor([2.0 - 0.05, -1.0 - 0.025]))


def test_params_without_grad_are_untouched():
    a = torch.ones(3, 3, requires_grad=True)
    b = torch.ones(3, 3, requires_grad=True)
    a.grad = torch.ones(3, 3)
    opt = LARS([a, b], lr=1.0)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3, 3))
    assert b not in opt.state
    assert not torch.equal(a.detach(), torch.ones(3, 3))


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    twin = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    x = torch.randn(16, 4)

    def step(m, opt):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()

    opt = LARS(lars_param_groups(model, 1e-4), lr=0.5)
    for _ in range(3):
        step(model, opt)
    twin.load_state_dict(model.state_dict())
    twin_opt = LARS(lars_param_groups(twin, 1e-4), lr=0.5)
    # A deep copy, as after a round trip through a file: loading aliases the saved tensors.
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    step(model, opt)
    step(twin, twin_opt)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_lars_param_groups_split_by_ndim():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2), nn.LayerNorm(2)
    )
    model[0].bias.requires_grad_(False)  # frozen parameters are left out
    groups = lars_param_groups(model, weight_decay=1e-6)
    decay, exclude = groups
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert decay["weight_decay"] == 1e-6 and decay["lars_exclude"] is False
    assert {id(p) for p in exclude["params"]} == {
        id(p) for p in (model[1].weight, model[1].bias, model[3].bias, *model[4].parameters())
    }
    assert exclude["weight_decay"] == 0.0 and exclude["lars_exclude"] is True


def test_lars_param_groups_drops_empty_groups():
    groups = lars_param_groups(nn.Linear(3, 3, bias=False))
    assert len(groups) == 1 and groups[0]["lars_exclude"] is False


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0.0}, "learning rate"),
        ({"lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"lr": 0.1, "weight_decay": -1.0}, "weight_decay"),
        ({"lr": 0.1, "eta": 0.0}, "eta"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LARS([torch.zeros(2, requires_grad=True)], **kwargs)


def test_lars_is_exported_from_package_root():
    import fastclr

    assert fastclr.LARS is LARS


def test_mixed_dtypes_in_one_group_match_numpy():
    rng = np.random.default_rng(3)
    w64, w32 = rng.standard_normal((4, 5)), rng.standard_normal((6,)).astype(np.float32)
    p64 = torch.tensor(w64, requires_grad=True)
    p32 = torch.tensor(w32, requires_grad=True)
    opt = LARS([p64, p32], lr=0.5, momentum=0.9, weight_decay=1e-3)
    v64, v32 = np.zeros_like(w64), np.zeros_like(w32, dtype=np.float64)
    ref64, ref32 = w64.copy(), w32.astype(np.float64)
    for _ in range(3):
        g64, g32 = rng.standard_normal(w64.shape), rng.standard_normal(w32.shape)
        p64.grad, p32.grad = torch.tensor(g64), torch.tensor(g32, dtype=torch.float32)
        opt.step()
        ref64, v64 = numpy_lars_step(ref64, g64, v64, 0.5, 0.9, 1e-3, 0.001, False)
        ref32, v32 = numpy_lars_step(ref32, g32, v32, 0.5, 0.9, 1e-3, 0.001, False)
    assert p32.dtype == torch.float32
    assert_close(p64.detach().numpy(), ref64, "float64 parameter")
    assert_close(p32.detach().double().numpy(), ref32, "float32 parameter", atol=1e-5, rtol=1e-5)
