"""The GPU check: its dry run goes through every section on the CPU, and its verdicts are the right ones."""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastclr.bench import gpu_check, gpu_check_loss

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(150)
def test_dry_run_runs_every_section_and_writes_json_and_csv(tmp_path):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < 90, f"the dry run took {elapsed:.0f} s"
    report = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    assert report["status"] == "pass" and report["run"] == "dry-run"
    sections = report["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    # Every case of the correctness grid ran and passed.
    # NT-Xent, SupCon and the bank at 2N = 2 and 8, DCL at 8 (one pair has no negative), each at three D.
    family = gpu_check_loss.FAMILY_CASES
    both = len(gpu_check_loss.DTYPE_CASES) + len(family["supcon"]) + len(family["bank"])
    assert len(sections["correctness"]) == (2 * both + len(family["dcl"])) * 3
    assert {r["case"] for r in sections["correctness"]} >= {
        "dcl-bf16",
        "supcon-fp32-ieee",
        "bank-bf16",
    }
    assert {r["status"] for r in sections["correctness"]} == {"ok"}
    loss = sections["loss"]
    assert {r["impl"] for r in loss} == {
        "triton",
        "torch",
        "reference",
        "compile",
        "lightly",
        "materialised",
    }
    family = {(r["loss"], r["impl"]) for r in loss if r["loss"] != "ntxent" and r["status"] == "ok"}
    assert family == {
        (loss, impl) for loss, impls in gpu_check_loss.FAMILY_TIMED.items() for impl in impls
    }
    assert all(r["status"] == "ok" or r["status"].startswith("skipped") for r in loss), loss
    triton = [r for r in loss if r["impl"] == "triton"]
    assert all(r["ms"] > 0 for r in triton)
    assert all(r["loss_err"] < 0.02 for r in triton if r["loss"] == "ntxent")
    assert sections["pipeline"][0]["pairs_per_s"] > 0
    assert [r["compile"] for r in sections["train"]] == [False, True]
    assert all(r["images_per_s"] > 0 for r in sections["train"])
    for section in gpu_check.SECTIONS:
        rows = list(csv.DictReader((tmp_path / f"gpu_check_{section}.csv").open()))
        assert len(rows) == len(sections[section]) and {r["run"] for r in rows} == {"dry-run"}
        assert rows[0]["device"] and rows[0]["torch"] == torch.__version__ and rows[0]["date"]


def _results(z, scale_a=1.0, loss=1.0):
    return torch.tensor(loss, dtype=torch.float64), z[0] * scale_a, z[1]


def test_compare_flags_a_mismatch_and_says_where():
    z = torch.randn(2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = _results(z)
    tol = gpu_check_loss.Tolerance(loss_rtol=1e-3, grad_rtol=1e-2)
    assert gpu_check_loss.compare(_results(z, scale_a=1.001), want, tol)["status"] == "ok"
    bad = z.clone()
    bad[1, 2, 1] += 1.0
    verdict = gpu_check_loss.compare(_results(bad), want, tol)
    assert verdict["status"] == "MISMATCH" and verdict["worst"].startswith("dz_b[2, 1]")
    assert verdict["grad_err"] == pytest.approx(1.0 / z[1].abs().max().item())
    assert gpu_check_loss.compare(_results(z, loss=1.01), want, tol)["status"] == "MISMATCH"


@pytest.mark.parametrize(
    "statuses, skipped, code",
    [
        (["ok", "skipped: lightly is not installed"], [], 0),
        (["ok", "MISMATCH"], [], 1),
        (["ok", "failed: out of memory"], [], 1),
        (["error: ValueError: x"], [], 1),
        (["ok", "skipped: time budget"], ["train"], 2),
    ],
)
def test_exit_status(statuses, skipped, code):
    budget = gpu_check.Budget(1.0)
    budget.skipped = skipped
    assert gpu_check.exit_status({"s": [{"status": s} for s in statuses]}, budget) == code


def test_peak_table_by_device_name():
    assert gpu_check_loss.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert gpu_check_loss.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert (
        gpu_check_loss.peak_tflops("NVIDIA H200", "float32") == 494.7
    )  # fp32 inputs run on tf32 tensor cores
    assert gpu_check_loss.peak_tflops("NVIDIA A100-SXM4-80GB", "float16") == 312.0
    assert gpu_check_loss.peak_tflops("AMD EPYC (2 cores)", "bfloat16") is None


def test_budget_refuses_an_item_that_would_not_fit():
    budget = gpu_check.Budget(100.0)
    assert budget.allows("small", 50)
    assert not budget.allows("large", 150) and budget.skipped[0].startswith("large (")
