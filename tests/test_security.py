"""Nothing a user hands to fastclr can run code: checkpoints are unpickled with ``weights_only=True``, configs are
parsed as data, and paths from configs and the command line never reach a shell.

Every malicious input here carries a payload that, if it ran, would create a marker on disk; the tests check both the
clear error and that the marker never appears. A positive control proves each payload really runs under a plain
``pickle.load``.
"""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastclr.train.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    find_latest_valid,
    load_checkpoint,
    save_checkpoint,
)
from fastclr.train.config import ConfigError, PretrainConfig
from fastclr.train.config_io import config_from_args, load_config

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("fastclr", "kernels", "pipelines", "bench")


class MakesMarker:
    """Unpickling this calls ``os.mkdir(marker)``: the classic code-execution payload, with a harmless effect."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def malicious_checkpoint(path: Path, marker: Path, *, legacy: bool = False) -> Path:
    """A file that looks like a fastclr checkpoint (marker, version, every key) with the payload as its "model"."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "step": 1,
        "epoch": 0,
        "batch": 1,
        "config": PretrainConfig().to_dict(),
        "model": MakesMarker(marker),
    }
    if legacy:  # a bare pickle, as torch.save wrote before its zip format
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    return path


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m fastclr ARGS`` in a child process, as a list of arguments (no shell), in ``cwd``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FASTCLR_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "fastclr", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def run_cli(capsys, monkeypatch, tmp_path):
    """``fastclr ARGS`` in this process (the console script's ``main``), run from ``tmp_path``: a relative marker a
    shell might create would land there. Returns a CompletedProcess-like (returncode, stdout, stderr)."""
    from fastclr.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTCLR_DEBUG", raising=False)

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single ``fastclr: error: ...`` line of a failed command (and no traceback)."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fastclr: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_payload_runs_under_plain_pickle(tmp_path, legacy):
    """Positive control: the crafted file really executes code when unpickled without weights_only."""
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.pt", marker, legacy=legacy)
    if legacy:
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_malicious_checkpoint_is_refused_without_running(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.pt", marker, legacy=legacy)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*evil\.pt") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)  # one clear line, not a dump of the unpickler's advice
    assert not marker.exists()


def test_resume_auto_skips_a_malicious_newest_checkpoint(tmp_path):
    """A planted file under a checkpoint name is reported and passed over; the genuine older one is used."""
    ckpt_dir = tmp_path / "checkpoints"
    good = save_checkpoint(
        {"step": 4, "epoch": 1, "batch": 0, "model": {"w": torch.ones(2)}, "config": {}}, ckpt_dir
    )
    marker = tmp_path / "pwned"
    malicious_checkpoint(ckpt_dir / "ckpt-000000009.pt", marker)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find_latest_valid(ckpt_dir) == good
    assert any("ckpt-000000009.pt" in str(w.message) for w in caught)
    assert not marker.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["export", "--ckpt", "{ckpt}", "--out", "backbone.pt"],
        ["knn", "--ckpt", "{ckpt}", "--data", "{cwd}", "--test-data", "{cwd}"],
        [
            "pretrain",
            "--resume",
            "{ckpt}",
            "--data",
            "{cwd}",
            "--arch",
            "cnn7",
            "--batch-size",
            "2",
        ],
    ],
    ids=["export", "knn", "pretrain-resume"],
)
def test_cli_refuses_malicious_checkpoint(tmp_path, run_cli, command):
    marker = tmp_path / "pwned"
    ckpt = malicious_checkpoint(tmp_path / "evil.pt", marker)
    if command[0] == "pretrain":  # a real data set, so that only the checkpoint can be the problem
        write_images(tmp_path / "data" / "a", 4)
    args = [a.format(ckpt=ckpt, cwd=tmp_path / "data") for a in command]
    line = one_line_error(run_cli(*args))
    assert "evil.pt" in line and "checkpoint" in line, line
    assert "weights_only" not in line, line  # never the advice to load it unsafely
    assert not marker.exists()
    assert not (tmp_path / "backbone.pt").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------

INJECTION = "__import__('os').mkdir('{marker}')"


def test_toml_string_values_stay_strings(tmp_path):
    marker = tmp_path / "pwned"
    code = INJECTION.format(marker=marker)
    path = tmp_path / "run.toml"
    path.write_text(f'[run]\nout = "{code}"\n[data]\ndata = "{code}"\n')
    cfg = load_config(path)
    assert cfg.run.out == code and cfg.data.data == code
    assert not marker.exists()


@pytest.mark.parametrize(
    "line",
    [
        'temperature = "{code}"',  # float field
        'batch_size = "{code}"',  # int field
        'cifar_stem = "{code}"',  # bool field
        '"{code}" = 1',  # as a key
    ],
)
def test_toml_code_in_typed_fields_is_rejected(tmp_path, line):
    marker = tmp_path / "pwned"
    path = tmp_path / "run.toml"
    path.write_text(line.format(code=INJECTION.format(marker=marker)) + "\n")
    with pytest.raises(ConfigError, match=r"__import__"):
        load_config(path)
    assert not marker.exists()


def test_arch_with_code_is_an_unknown_arch(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "run.toml"
    path.write_text(f'[model]\narch = "{INJECTION.format(marker=marker)}"\n')
    cfg = load_config(path)
    with pytest.raises(ConfigError, match="unknown arch"):
        cfg.validate()
    assert not marker.exists()


def test_yaml_python_tags_are_rejected(tmp_path):
    pytest.importorskip("yaml")
    marker = tmp_path / "pwned"
    path = tmp_path / "run.yaml"
    path.write_text(f"run:\n  out: !!python/object/apply:os.mkdir ['{marker}']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    assert not marker.exists()


def test_cli_flag_with_code_is_not_evaluated(tmp_path):
    import argparse

    from fastclr.train.config_io import add_config_flags

    marker = tmp_path / "pwned"
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_flags(parser)
    code = INJECTION.format(marker=marker)
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["--temperature", code])
    cfg = config_from_args(parser.parse_args(["--out", code, "--arch", code]))
    assert cfg.run.out == code and cfg.model.arch == code
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Source audit: no eval/exec, no shell, no unsafe deserialisation anywhere in the package
# ---------------------------------------------------------------------------------------------------------------------

# (file, call) pairs that are allowed, each with the reason it is safe.
ALLOWED = {
    # Spawned benchmark ranks receive their own worker function through pickle (argv of a multiprocessing child) and
    # write results into a TemporaryDirectory (mode 0700) that the parent reads back: no user-supplied file.
    ("bench/bench_dist.py", "pickle.loads"),
    ("bench/bench_dist.py", "torch.load"),
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


CODE_RUNNERS = {"eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"}
SHELL_CALLS = {"os.system", "os.popen"}
UNSAFE_LOADERS = {
    *(f"{m}.{f}" for m in ("pickle", "marshal", "dill") for f in ("load", "loads", "Unpickler")),
    "shelve.open",
    *(f"yaml.{f}" for f in ("load", "load_all", "unsafe_load", "full_load")),
}


def unsafe_label(name: str, keywords: dict[str, ast.AST]) -> str | None:
    """Why a call to ``name`` can run code from data or hand a string to a shell, or None."""
    if name in CODE_RUNNERS | SHELL_CALLS | UNSAFE_LOADERS or name.startswith(
        ("os.exec", "os.spawn")
    ):
        return name
    if name.startswith("subprocess.") and "shell" in keywords:
        shell = keywords["shell"]
        return (
            None
            if isinstance(shell, ast.Constant) and shell.value is False
            else f"{name}(shell=...)"
        )
    if name == "torch.load":
        weights_only = keywords.get("weights_only")
        return (
            None if isinstance(weights_only, ast.Constant) and weights_only.value is True else name
        )
    return None


def unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, label) of every unsafe call in a parsed module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            label = unsafe_label(_dotted(node.func), {k.arg: k.value for k in node.keywords})
            if label is not None:
                found.append((node.lineno, label))
    return found


def project_sources() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20, files  # the audit must actually see the package
    return files


def test_source_has_no_eval_exec_shell_or_unsafe_load():
    offenders = []
    for path in project_sources():
        rel = path.relative_to(REPO).as_posix()
        for line, call in unsafe_calls(ast.parse(path.read_text(), filename=rel)):
            if (rel, call) not in ALLOWED:
                offenders.append(f"{rel}:{line}: {call}")
    assert not offenders, "unsafe calls:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    "snippet,expected",
    [
        ("eval(text)", "eval"),
        ("exec(code)", "exec"),
        ("subprocess.run(cmd, shell=True)", "subprocess.run(shell=...)"),
        ("os.system('ls ' + path)", "os.system"),
        ("torch.load(path)", "torch.load"),
        ("torch.load(path, weights_only=False)", "torch.load"),
        ("pickle.load(f)", "pickle.load"),
        ("yaml.load(text)", "yaml.load"),
    ],
)
def test_audit_catches_unsafe_calls(snippet, expected):
    """The audit itself can fail: each unsafe pattern is reported."""
    assert [c for _, c in unsafe_calls(ast.parse(snippet))] == [expected]


def test_audit_passes_safe_calls():
    safe = "model.eval()\nsubprocess.run(['ls', path])\ntorch.load(p, weights_only=True)\nyaml.safe_load(t)\n"
    assert unsafe_calls(ast.parse(safe)) == []


# ---------------------------------------------------------------------------------------------------------------------
# Paths from the command line never reach a shell
# ---------------------------------------------------------------------------------------------------------------------

SHELLY = "x; mkdir pwned1 #"  # a path a shell would split into a second command


def write_images(folder: Path, count: int, size: int = 20, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def shell_markers(root: Path) -> list[Path]:
    return [p for p in root.rglob("pwned*") if p.name.startswith("pwned")]


def test_missing_data_path_with_shell_syntax_is_reported_as_a_path(tmp_path, run_cli):
    line = one_line_error(run_cli("pretrain", "--data", SHELLY, "--arch", "cnn7"))
    assert SHELLY in line and "no such file or directory" in line, line
    assert not shell_markers(tmp_path)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_data_and_out_paths_with_shell_syntax_are_used_verbatim(tmp_path, run_cli, backend):
    """A real run on a data set and an output directory named like shell commands: trains, writes its checkpoint
    under the literal name, creates no marker. The DALI run goes through the console command in a child process."""
    data = tmp_path / "imgs; mkdir pwned2 #" / "cls $(mkdir pwned3)"
    write_images(data, 8)
    write_images(data.parent / "`mkdir pwned4`", 8, seed=1)
    out = tmp_path / "out && mkdir pwned5"
    args = [
        "pretrain", "--data", str(data.parent), "--out", str(out), "--backend", backend,
        "--arch", "cnn7", "--width", "8", "--size", "16", "--batch-size", "8", "--epochs", "1",
        "--workers", "1", "--knn-every", "0", "--no-progress", "--max-steps", "1",
    ]  # fmt: skip
    proc = cli(*args, cwd=tmp_path) if backend == "dali" else run_cli(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["ckpt-000000001.pt"]
    assert load_checkpoint(out / "checkpoints" / "ckpt-000000001.pt")["config"]["data"][
        "data"
    ] == str(data.parent)
    assert not shell_markers(tmp_path)
