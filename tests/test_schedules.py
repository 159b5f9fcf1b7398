"""Learning-rate scaling and the warm-up + cosine schedule."""

import math

import pytest
import torch

from fastclr.optim import LARS, WarmupCosine, scaled_lr


def make_scheduler(total=100, warmup=10, base_lr=1.2, groups=1):
    params = [{"params": [torch.zeros(2, requires_grad=True)]} for _ in range(groups)]
    opt = LARS(params, lr=base_lr)
    return opt, WarmupCosine(opt, total_steps=total, warmup_steps=warmup, base_lr=base_lr)


def run_steps(opt, sched, n):
    for _ in range(n):
        opt.step()
        sched.step()


def test_scaled_lr_linear_and_sqrt():
    assert scaled_lr(256) == pytest.approx(0.3)
    assert scaled_lr(4096) == pytest.approx(4.8)
    assert scaled_lr(512, base_lr=1.0) == pytest.approx(2.0)
    assert scaled_lr(4096, scaling="sqrt") == pytest.approx(0.075 * 64)
    assert scaled_lr(100, base_lr=0.1, scaling="sqrt") == pytest.approx(1.0)


@pytest.mark.parametrize(
    "args, match",
    [((0,), "batch_size"), ((256, -0.1), "base_lr"), ((256, None, "cubic"), "scaling")],
)
def test_scaled_lr_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        scaled_lr(*args)


def test_values_at_warmup_start_end_and_last_step():
    opt, sched = make_scheduler(total=100, warmup=10, base_lr=1.2)
    assert sched.get_last_lr() == [0.0]
    assert opt.param_groups[0]["lr"] == 0.0
    run_steps(opt, sched, 5)
    assert sched.get_last_lr()[0] == pytest.approx(0.6)  # halfway through warm-up
    run_steps(opt, sched, 5)
    assert sched.get_last_lr()[0] == pytest.approx(1.2)  # warm-up end = peak
    run_steps(opt, sched, 45)
    assert sched.get_last_lr()[0] == pytest.approx(0.6)  # halfway through the cosine
    run_steps(opt, sched, 44)
    last = sched.get_last_lr()[0]  # step 99, the last one of the run
    assert last == pytest.approx(1.2 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert 0 < last < 1e-3
    run_steps(opt, sched, 1)
    assert sched.get_last_lr()[0] == 0.0


def test_lr_at_is_pure_and_matches_the_formula():
    _, sched = make_scheduler(total=50, warmup=5, base_lr=2.0)
    for step in range(60):
        if step < 5:
            expected = 2.0 * step / 5
        elif step >= 50:
            expected = 0.0
        else:
            expected = 2.0 * 0.5 * (1 + math.cos(math.pi * (step - 5) / 45))
        assert sched.lr_at(step) == pytest.approx(expected, abs=1e-12), step
    assert sched.last_epoch == 0  # lr_at did not advance the scheduler


def test_monotone_up_then_down_and_every_group_follows():
    opt, sched = make_scheduler(total=40, warmup=8, groups=2)
    lrs = []
    for _ in range(40):
        lrs.append(sched.get_last_lr())
        run_steps(opt, sched, 1)
    assert all(a == b for a, b in lrs)
    first = [a for a, _ in lrs]
    assert first[:9] == sorted(first[:9])
    assert first[8:] == sorted(first[8:], reverse=True)


def test_no_warmup_starts_at_peak():
    _, sched = make_scheduler(total=10, warmup=0, base_lr=0.5)
    assert sched.get_last_lr() == [0.5]


def test_state_dict_round_trip():
    opt, sched = make_scheduler(total=100, warmup=10)
    run_steps(opt, sched, 37)
    state = sched.state_dict()
    opt2, sched2 = make_scheduler(total=100, warmup=10)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 37
    run_steps(opt, sched, 1)
    run_steps(opt2, sched2, 1)
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert opt2.param_groups[0]["lr"] == pytest.approx(sched.lr_at(38))


@pytest.mark.parametrize(
    "total, warmup, base_lr, match",
    [
        (0, 0, 1.0, "total_steps"),
        (10, 11, 1.0, "warmup_steps"),
        (10, -1, 1.0, "warmup_steps"),
        (10, 2, 0.0, "base_lr"),
    ],
)
def test_rejects_bad_arguments(total, warmup, base_lr, match):
    opt = LARS([torch.zeros(2, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match=match):
        WarmupCosine(opt, total_steps=total, warmup_steps=warmup, base_lr=base_lr)
