"""``fastclr distill``: the loss against a hand computation, finetune -> distill -> export -> reload, exact resume with
the labelled stream, and the teacher/student checks."""

import math
import shutil

import pytest
import torch
from test_finetune import pretrained, tiny
from test_trainer import make_image_folder

from fastclr.cli import main
from fastclr.train.config import ConfigError
from fastclr.train.distill import configure, distill, distill_loss
from fastclr.train.evaluate import export_classifier, load_model
from fastclr.train.finetune import finetune
from fastclr.train.stage import load_classifier


def test_loss_matches_a_hand_computation():
    student = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, -2.0]], requires_grad=True)
    tau = 2.0

    def softmax(row):
        e = [math.exp(v / tau) for v in row]
        return [v / sum(e) for v in e]

    expected = 0.0
    for s, t in zip(student.tolist(), teacher.tolist(), strict=True):
        expected -= sum(pt * math.log(ps) for pt, ps in zip(softmax(t), softmax(s), strict=True))
    expected /= 2
    loss = distill_loss(student, teacher, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None  # the teacher only gives targets

    # a student equal to its teacher scores the teacher's entropy, and no student scores less
    t = torch.randn(5, 7)
    entropy = -(t.softmax(1) * t.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(distill_loss(t, t), entropy)
    assert distill_loss(torch.randn(5, 7), t) > entropy
    with pytest.raises(ValueError, match=r"student logits \(5, 7\) and teacher logits \(5, 6\)"):
        distill_loss(t, torch.randn(5, 6))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data, and a teacher fine-tuned for one epoch on half the labels (4 steps)."""
    root = tmp_path_factory.mktemp("distill")
    data = make_image_folder(root / "train"), make_image_folder(root / "test", per_class=6, seed=1)
    ckpt = pretrained(root / "pre")[0]
    run = finetune(*tiny(ckpt, data, root / "teacher", epochs=1, test_data=None))
    return data, run["checkpoint"], root


def small(teacher, data, out, **kw):
    """Every one of the 64 training images, batch 16: 4 steps per epoch, 2 epochs, no test monitor."""
    overrides = dict(
        workers=1,
        batch_size=16,
        epochs=2,
        out=str(out),
        progress=False,
        log_every=2,
        lr=0.5,
        warmup_epochs=0.0,
    )
    overrides.update(kw.pop("overrides", {}))
    return configure(teacher, str(data[0]), overrides=overrides, **kw)


def test_finetune_distill_export_reload(setup, capsys):
    data, teacher, root = setup
    teacher_model, teacher_cfg = load_classifier(teacher)

    # self-distillation on a flat folder of the training images (labels unused)
    flat = root / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted(data[0].rglob("*.jpg"))):
        shutil.copy(f, flat / f"{i:03d}.jpg")
    monitored = {"test_data": str(data[1]), "epochs": 1}
    cfg, model, subset, files = small(
        teacher, (flat, data[1]), root / "self", temperature=0.1, overrides=monitored
    )
    assert subset is None and len(files) == 64 and cfg.model.arch == teacher_cfg.model.arch
    r = distill(cfg, model, subset, files)
    assert r["status"] == "completed" and r["step"] == 4 and r["knn_final"] is not None
    assert "test top-1" in capsys.readouterr().out
    columns = (root / "self" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "teacher_agreement" in columns and "contrastive_top1" not in columns
    assert (root / "self" / "test.csv").read_text().startswith("step,epoch,test_top1")

    # big-to-small: a half-width student, plus the cross-entropy on the teacher's own labels
    labels = root / "teacher" / "labels.txt"
    cfg, model, subset, files = small(
        teacher,
        data,
        root / "half",
        student_width=4,
        labels_file=labels,
        label_weight=0.5,
        overrides={"epochs": 1},
    )
    assert cfg.model.width == 4 and len(subset.files) == 32 and files is None
    r = distill(cfg, model, subset, files)
    assert r["status"] == "completed" and len(r["losses"]) == 4
    assert math.isfinite(r["losses"][-1])

    student, scfg = load_classifier(r["checkpoint"])
    # what fastclr knn / linear evaluate: the student's backbone
    evaluated, _ = load_model(r["checkpoint"])
    for key, value in student.backbone.state_dict().items():
        assert torch.equal(evaluated.backbone.state_dict()[key], value), key
    assert scfg.head_layers == 0 and student.fc.weight.shape == (
        4,
        32,
    )  # cnn7 width 4: 32-d features
    out = root / "student.safetensors"
    assert main(["export", "--ckpt", r["checkpoint"], "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    scope: dict = {}
    exec(line, scope)  # plain PyTorch: the builder and the file, nothing of the run
    x = torch.randn(2, 3, 16, 16)
    for key, value in student.state_dict().items():
        assert torch.equal(scope["model"].state_dict()[key], value), key
    torch.testing.assert_close(scope["model"].eval()(x), student(x))
    assert export_classifier(teacher, root / "t.pt")["head_layers"] == 1


def test_resume_with_the_labelled_stream_is_exact(setup):
    data, teacher, root = setup
    labels = root / "teacher" / "labels.txt"
    kw = dict(student_width=4, labels_file=labels, label_weight=1.0)
    full = distill(*small(teacher, data, root / "full", **kw))
    cut = distill(*small(teacher, data, root / "cut", overrides={"max_steps": 5}, **kw))
    assert cut["status"] == "max_steps"
    rest = distill(*small(teacher, data, root / "cut", overrides={"resume": "auto"}, **kw))
    assert cut["losses"] + rest["losses"] == full["losses"]


def test_teacher_and_student_mismatches_are_refused(setup, tmp_path):
    data, teacher, root = setup
    three = make_image_folder(tmp_path / "three", classes=3)
    with pytest.raises(ConfigError, match=r"has 3 class folders .* classifies 4 classes"):
        small(teacher, (three, data[1]), tmp_path / "o")
    with pytest.raises(ConfigError, match=r"--size 32: the teacher .* trained on 16 px crops"):
        small(teacher, data, tmp_path / "o", overrides={"size": 32})
    with pytest.raises(ConfigError, match="--label-weight 0.5 needs the labelled images"):
        small(teacher, data, tmp_path / "o", label_weight=0.5)
    with pytest.raises(ConfigError, match="--temperature must be a positive finite number"):
        small(teacher, data, tmp_path / "o", temperature=0.0)
    pre = pretrained(tmp_path / "pre")[0]
    with pytest.raises(ConfigError, match="is a pretraining checkpoint, without a classifier"):
        small(pre, data, tmp_path / "o")
    assert main(["distill", "--teacher", str(tmp_path / "none.pt"), "--data", str(data[0])]) == 1
    assert not (tmp_path / "o").exists()


def test_warm_up_is_a_share_of_a_short_run(setup, tmp_path):
    """v2's 10 warm-up epochs of 400; a 16-epoch run warms up for 2.5% of it, not for 10 of its 16 epochs."""
    data, teacher, _ = setup

    def warmup(**overrides):
        cfg = configure(teacher, str(data[0]), overrides=dict(out=str(tmp_path), **overrides))[0]
        return cfg.optim.warmup_epochs

    assert warmup() == 10.0  # the default 400 epochs
    assert warmup(epochs=16) == pytest.approx(0.4)
    assert warmup(epochs=16, warmup_epochs=3.0) == 3.0  # asked for: kept


def test_distillation_on_unlabelled_tar_shards_equals_their_folder(setup):
    """Shards without labels (written from a flat folder) give the student the same batches: the same losses."""
    from fastclr.pipelines.shard_writer import write_shards

    data, teacher, root = setup
    flat = root / "flat-for-shards"
    flat.mkdir()
    for i, f in enumerate(sorted(data[0].rglob("*.jpg"))):
        shutil.copy(f, flat / f"{i:03d}.jpg")
    write_shards(flat, root / "flat-shards", shard_size=24, progress=False)  # 64 images: 3 shards
    kw = dict(overrides={"epochs": 1, "backend": "torch"})
    from_folder = distill(*small(teacher, (flat, None), root / "from-folder", **kw))
    cfg, model, subset, files = small(
        teacher, (root / "flat-shards", None), root / "from-shards", **kw
    )
    assert subset is None and len(files) == 64 and all(".tar:" in f for f in files)
    from_shards = distill(cfg, model, subset, files)
    assert from_shards["status"] == "completed" and from_shards["step"] == 4
    assert from_shards["losses"] == from_folder["losses"]


@pytest.mark.parametrize("stage", ["finetune", "distill"])
def test_sigterm_stops_each_stage_with_a_checkpoint_that_resumes(setup, tmp_path, stage):
    """SIGTERM mid-epoch: exit 0, a checkpoint at the interrupted step (no temp file left), and --resume auto goes on
    from it."""
    import sys

    from test_trainer import sigterm_after_rows

    from fastclr.train.checkpoint import list_checkpoints, load_checkpoint

    data, teacher, root = setup
    out = tmp_path / stage
    if stage == "finetune":
        pre = next((root / "pre").glob("ckpt-*.pt"))
        args = ["--ckpt", str(pre), "--label-fraction", "0.5", "--batch-size", "8", "--size", "16"]
    else:
        args = ["--teacher", teacher, "--batch-size", "16"]
    flags = [stage, *args, "--data", str(data[0]), "--out", str(out), "--workers", "0"]
    flags += ["--backend", "torch", "--log-every", "1", "--no-progress"]
    metrics = out / "metrics.csv"
    code, output = sigterm_after_rows(
        [sys.executable, "-m", "fastclr", *flags, "--epochs", "100"], metrics, 2
    )
    assert code == 0, output
    assert "stopped by SIGTERM" in output, output
    logged = len(metrics.read_text().splitlines()) - 1
    ckpt = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert ckpt["step"] == logged  # saved where the signal came, not at an epoch end
    assert not list((out / "checkpoints").glob("*.tmp"))
    more = [*flags, "--epochs", "100", "--resume", "auto", "--max-steps", str(ckpt["step"] + 1)]
    assert main(more) == 0
    assert load_checkpoint(list_checkpoints(out / "checkpoints")[-1])["step"] == ckpt["step"] + 1
