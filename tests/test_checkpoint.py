"""Atomic checkpoints: naming, pruning, validation, config checks and RNG round-trips."""

import errno
import os
import random
import shutil

import numpy as np
import pytest
import torch

from fastclr.train.checkpoint import (
    CheckpointError,
    atomic_save,
    check_config,
    find_latest_valid,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _state(step, **extra):
    return {
        "step": step,
        "epoch": 0,
        "batch": step,
        "model": {"w": torch.full((2,), float(step))},
        "config": {"run": {"seed": 0}},
        **extra,
    }


def test_save_load_round_trip(tmp_path):
    path = save_checkpoint(_state(7, rng=rng_state()), tmp_path)
    assert path.name == "ckpt-000000007.pt"
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 7 and torch.equal(ckpt["model"]["w"], torch.full((2,), 7.0))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_keep_last_k_sorted_by_step(tmp_path):
    for step in (5, 100, 20, 1000):
        save_checkpoint(_state(step), tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-000000100.pt",
        "ckpt-000001000.pt",
    ]


def test_find_latest_valid_skips_corrupt(tmp_path):
    save_checkpoint(_state(1), tmp_path, keep=5)
    good = save_checkpoint(_state(2), tmp_path, keep=5)
    bad = save_checkpoint(_state(3), tmp_path, keep=5)
    bad.write_bytes(bad.read_bytes()[:100])  # truncated, as if the disk filled up
    with pytest.warns(UserWarning, match="ckpt-000000003"):
        assert find_latest_valid(tmp_path) == good
    assert find_latest_valid(tmp_path / "nothing-here") is None


def test_unreadable_and_foreign_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt is not a fastclr checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_load_refuses_to_run_code(tmp_path, capsys):
    torch.save({"format": "fastclr-checkpoint", "payload": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "evil.pt")
    assert "code ran" not in capsys.readouterr().out


def test_failed_save_leaves_nothing(tmp_path):
    save_checkpoint(_state(1), tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails inside torch.save
        atomic_save({"f": lambda: 0}, tmp_path / "ckpt-000000002.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000001.pt"]


def test_check_config_names_the_mismatching_keys():
    saved = {"model": {"arch": "resnet18", "width": 64}, "optim": {"lr": 0.3}}
    check_config(saved, {"model": {"arch": "resnet18", "width": 64}, "optim": {"lr": 0.3}})
    with pytest.raises(CheckpointError, match=r"model\.width \(checkpoint 64, now 32\).*optim\.lr"):
        check_config(saved, {"model": {"arch": "resnet18", "width": 32}, "optim": {"lr": 0.5}})
    check_config(
        saved,
        {"model": {"arch": "resnet18", "width": 32}, "optim": {"lr": 0.3}},
        ignore=frozenset({"model.width"}),
    )


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    path = save_checkpoint(_state(1, rng=rng_state()), tmp_path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(load_checkpoint(path)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert (
        torch.equal(got[0], expected[0])
        and np.array_equal(got[1], expected[1])
        and got[2] == expected[2]
    )


def _names(directory) -> list[str]:
    return [p.name for p in list_checkpoints(directory)]


def test_pruning_never_counts_an_unloadable_checkpoint(tmp_path):
    """A corrupt ckpt of a later step once made --keep 1 delete every checkpoint the run wrote."""
    (tmp_path / "ckpt-000000099.pt").write_bytes(b"not a checkpoint")
    for step in (1, 2, 3):
        save_checkpoint(_state(step), tmp_path, keep=1)
    assert _names(tmp_path) == ["ckpt-000000003.pt", "ckpt-000000099.pt"]  # later steps: untouched


def test_pruning_keeps_loadable_checkpoints_past_an_unloadable_one(tmp_path):
    save_checkpoint(_state(1), tmp_path, keep=2)
    bad = save_checkpoint(_state(2), tmp_path, keep=2)
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    save_checkpoint(_state(3), tmp_path, keep=2)
    assert _names(tmp_path) == [
        f"ckpt-00000000{s}.pt" for s in (1, 2, 3)
    ]  # 1 is the 2nd that loads
    save_checkpoint(_state(4), tmp_path, keep=2)
    assert _names(tmp_path) == ["ckpt-000000003.pt", "ckpt-000000004.pt"]


class _Code:
    def __reduce__(self):
        return (print, ("code ran",))


def test_unreadable_checkpoint_messages_never_advise_disabling_weights_only(tmp_path):
    import pickle

    good = save_checkpoint(_state(1), tmp_path / "ok")
    files = {
        "junk": b"\x00garbage",
        "truncated": good.read_bytes()[:200],
        "legacy": pickle.dumps({"model": _Code()}, protocol=2),
    }
    for name, content in files.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
    torch.save({"model": _Code()}, tmp_path / "code.pt")
    for name in [*files, "code"]:
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / f"{name}.pt")
        message = str(info.value)
        assert f"{name}.pt: not a fastclr checkpoint, or corrupt (" in message, message
        assert "weights_only" not in message and "\n" not in message, message


def _serialiser_failure(errno_in_context: int | None):
    """A ``torch.save`` that fails as torch's zip writer does when the file's write fails (disk full): it swallows
    the OSError and raises ``RuntimeError: [enforce fail at inline_container.cc:672] ...`` instead."""

    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        try:
            if errno_in_context is not None:
                raise OSError(errno_in_context, os.strerror(errno_in_context))
        finally:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
            )

    return save


@pytest.mark.parametrize(
    ("in_context", "free", "expected"),
    [(errno.ENOSPC, 10**9, errno.ENOSPC), (None, 0, errno.ENOSPC), (None, 10**9, errno.EIO)],
    ids=["recorded", "disk-full", "unknown"],
)
def test_serialiser_errors_become_the_os_error_naming_the_file(
    tmp_path, monkeypatch, in_context, free, expected
):
    from fastclr.train import checkpoint

    save_checkpoint(_state(1), tmp_path)
    monkeypatch.setattr(checkpoint.torch, "save", _serialiser_failure(in_context))
    usage = shutil.disk_usage(tmp_path)._replace(free=free)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage)
    with pytest.raises(OSError) as info:
        save_checkpoint(_state(2), tmp_path)
    assert info.value.errno == expected
    assert (
        str(info.value)
        == f"[Errno {expected}] cannot write {tmp_path / 'ckpt-000000002.pt'}: {os.strerror(expected)}"
    )
    assert _names(tmp_path) == ["ckpt-000000001.pt"] and len(list(tmp_path.iterdir())) == 1
