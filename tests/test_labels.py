"""Label subsets: class-balanced seeded draws, the official 1percent.txt format, the run's own list, every bad input."""

import math
import os
from pathlib import Path

import pytest

from fastclr.train.labels import (
    LabelError,
    draw_subset,
    label_subset,
    write_file_list,
    write_subset,
)

# a JPEG as the up-front check sees it (start and end markers); never decoded here
JPEG = b"\xff\xd8\xff\xe0" + bytes(32) + b"\xff\xd9"


def image_folder(root: Path, sizes: dict[str, int], prefix: bool = True) -> Path:
    """ImageFolder with ``sizes[c]`` files per class, named like ImageNet's (``<class>_<i>.JPEG``) when ``prefix``."""
    for c, n in sizes.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            (root / c / (f"{c}_{i}.JPEG" if prefix else f"{i}.JPEG")).write_bytes(JPEG)
    return root


@pytest.fixture
def data(tmp_path):
    return image_folder(tmp_path / "train", {"n01": 100, "n02": 50, "n03": 20})


def by_class(subset):
    counts = {}
    for f, y in zip(subset.files, subset.labels, strict=True):
        assert Path(f).parent.name == subset.classes[y]  # every file keeps its own class
        counts[subset.classes[y]] = counts.get(subset.classes[y], 0) + 1
    return counts


def test_fraction_draws_the_same_share_of_every_class_reproducibly(data):
    a = label_subset(data, fraction=0.1, seed=0)
    assert by_class(a) == {"n01": 10, "n02": 5, "n03": 2}
    assert a.total == 170 and a.fraction == pytest.approx(17 / 170)
    assert label_subset(data, fraction=0.1, seed=0) == a  # same seed, same subset
    b = label_subset(data, fraction=0.1, seed=1)
    assert by_class(b) == by_class(a) and b.files != a.files  # another seed, another draw
    assert len(set(a.files)) == len(a.files)
    assert by_class(label_subset(data, fraction=1.0, seed=3)) == {"n01": 100, "n02": 50, "n03": 20}


def test_one_class_draw_does_not_depend_on_the_others(tmp_path):
    small = label_subset(image_folder(tmp_path / "a", {"x": 40, "y": 10}), fraction=0.25, seed=7)
    large = label_subset(image_folder(tmp_path / "b", {"x": 40, "y": 90}), fraction=0.25, seed=7)
    assert [Path(f).name for f in small.files[:10]] == [Path(f).name for f in large.files[:10]]


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, math.nan, math.inf, True])
def test_fraction_outside_0_1_is_refused(data, fraction):
    with pytest.raises(LabelError, match=r"--label-fraction must be a number in \(0, 1\]"):
        label_subset(data, fraction=fraction)


def test_a_fraction_that_leaves_a_class_without_labels_names_it(data):
    with pytest.raises(
        LabelError, match=r"leaves class 'n03' \(20 images\) without a label; give at least 0\.025"
    ):
        label_subset(data, fraction=0.02)


def test_official_file_names_match_by_name_skipping_blanks_and_comments(data, tmp_path):
    listing = tmp_path / "1percent.txt"
    listing.write_text("# official subset\nn02_7.JPEG\n\nn01_3.JPEG\n  n03_19.JPEG  \n")
    subset = label_subset(data, labels_file=listing)
    assert [os.path.relpath(f, data) for f in subset.files] == [
        "n01/n01_3.JPEG",
        "n02/n02_7.JPEG",
        "n03/n03_19.JPEG",
    ]  # in --data's order
    assert subset.labels == [0, 1, 2]


def test_the_written_subset_reads_back_identically(data, tmp_path):
    drawn = label_subset(data, fraction=0.1, seed=4)
    written = write_subset(drawn, data, tmp_path / "labels.txt")
    lines = written.read_text().splitlines()
    assert lines[0].startswith("n01/") and len(lines) == 17  # relative to --data
    assert label_subset(data, labels_file=written) == drawn
    # absolute paths work too, and so does reading it from another working directory
    (tmp_path / "abs.txt").write_text("".join(str(Path(f).resolve()) + "\n" for f in drawn.files))
    assert label_subset(data, labels_file=tmp_path / "abs.txt") == drawn


def test_the_loader_list_holds_absolute_paths_and_class_indices(data, tmp_path):
    from fastclr.pipelines.data import scan_images

    drawn = label_subset(data, fraction=0.1, seed=0)
    listing = scan_images(write_file_list(drawn, tmp_path / "labels.list"))
    assert listing.files == [str(Path(f).resolve()) for f in drawn.files]
    assert listing.labels == drawn.labels and listing.classes == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"names no image \(an empty subset\)"),
        ("# only a comment\n\n", r"names no image"),
        (
            "n01_1.JPEG\nn09_1.JPEG\nn01/missing.JPEG\n",
            r"2 of 3 names are not images under --data .*'n09_1\.JPEG'",
        ),
        (
            "n01_1.JPEG\nn02_1.JPEG\nn01_1.JPEG\n",
            r"listed more than once: 'n01_1\.JPEG \(lines 1 and 3\)'",
        ),
        ("n01_1.JPEG\nn02_1.JPEG\n", r"leaves 1 of the 3 classes .* without a label: 'n03'"),
    ],
)
def test_bad_label_files_are_refused_naming_the_problem(data, tmp_path, text, match):
    listing = tmp_path / "labels.txt"
    listing.write_text(text)
    with pytest.raises(LabelError, match=match):
        label_subset(data, labels_file=listing)


def test_a_name_two_images_share_asks_for_paths(tmp_path):
    data = image_folder(tmp_path / "d", {"a": 3, "b": 3}, prefix=False)  # a/0.JPEG and b/0.JPEG
    (tmp_path / "l.txt").write_text("0.JPEG\n")
    with pytest.raises(
        LabelError, match=r"shared by several images .*'0\.JPEG \(2 images\)'.*relative to --data"
    ):
        label_subset(data, labels_file=tmp_path / "l.txt")
    (tmp_path / "p.txt").write_text("a/0.JPEG\nb/0.JPEG\n")
    assert len(label_subset(data, labels_file=tmp_path / "p.txt").files) == 2


def test_other_bad_inputs(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="--labels-file .*no such file"):
        label_subset(data, labels_file=tmp_path / "none.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(LabelError, match="not a text file"):
        label_subset(data, labels_file=tmp_path / "bin.txt")
    with pytest.raises(LabelError, match="exactly one of --label-fraction and --labels-file"):
        label_subset(data)
    with pytest.raises(LabelError, match="exactly one"):
        label_subset(data, fraction=0.5, labels_file=tmp_path / "bin.txt")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.jpg").write_bytes(JPEG)
    with pytest.raises(LabelError, match="flat folder of unlabelled images"):
        label_subset(flat, fraction=0.5)
    with pytest.raises(LabelError, match="1 class folder"):
        label_subset(image_folder(tmp_path / "one", {"a": 4}), fraction=0.5)


def test_label_errors_are_config_errors():
    """The trainer re-raises ConfigErrors as they are: the message stays the one written here."""
    from fastclr.train.config import ConfigError

    assert issubclass(LabelError, ConfigError)


def test_draw_subset_directly():
    files = [f"c{y}/{i}.jpg" for y in range(2) for i in range(10)]
    labels = [y for y in range(2) for _ in range(10)]
    s = draw_subset(files, labels, ["c0", "c1"], 0.3, seed=0)
    assert s.labels == [0, 0, 0, 1, 1, 1] and s.total == 20
