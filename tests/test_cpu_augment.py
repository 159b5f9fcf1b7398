"""The numba-compiled CPU augmentation against DALI's own ops, which are its oracle.

Each case feeds the same uint8 images and the same per-sample strengths to the fused kernel
(called directly) and to the DALI ops the GPU pipeline runs (``augment_impl="dali"``), through
``external_source``. Both round to uint8 after every op, so they agree up to the rounding of
values that land within float error of a half level: we accept a difference of at most
``MAX_LEVELS`` levels on at most ``MAX_FRACTION`` of the values. A wrong matrix, border rule,
order or rounding mode moves most values by one level or more.
"""

from itertools import permutations

import numpy as np
import pytest
from PIL import Image

from fastclr.pipelines import dali_available

pytestmark = [
    pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not importable"),
    pytest.mark.timeout(120),
]
ca = pytest.importorskip("fastclr.pipelines.dali.cpu_augment")

MAX_LEVELS, MAX_FRACTION = 2, 0.01
SIZES = [(40, 56), (33, 47), (64, 64), (17, 90)]  # odd sides and a wide strip


def smooth_images(seed=0):
    """Photo-like uint8 HWC images: upsampled random colour fields, every level in use."""
    rng = np.random.default_rng(seed)
    coarse = [rng.integers(0, 256, (4, 5, 3), dtype=np.uint8) for _ in SIZES]
    return [
        np.asarray(Image.fromarray(c).resize((w, h), Image.BICUBIC))
        for c, (h, w) in zip(coarse, SIZES, strict=True)
    ]


def noise_images(seed=0):
    """Independent uniform noise per value: every tap of a blur, borders included, shows."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def fused(images, params):
    out = []
    for img, p in zip(images, params, strict=True):
        x = img.reshape(-1).copy()
        ca.augment_pixels(x, img.shape[0], img.shape[1], np.asarray(p, np.float32))
        out.append(x.reshape(img.shape))
    return out


def dali_ops(images, args, graph):
    """Run ``graph(img, *per-sample args)`` on the CPU over ``images``; ``args[i]`` is sample i's.

    Returns the output's images, or a list of them per output where the graph has several.
    """
    from nvidia.dali import fn, pipeline_def

    def feed(k):
        return lambda: [np.array(a[k], np.float32) for a in args]

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=0)
    def pipe():
        img = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        per_sample = [fn.external_source(source=feed(k), batch=True) for k in range(len(args[0]))]
        return graph(img, *per_sample)

    p = pipe()
    p.build()
    batches = [[np.array(out[i]) for i in range(len(images))] for out in p.run()]
    return batches[0] if len(batches) == 1 else batches


def assert_close(got, want, what):
    diff = np.concatenate(
        [np.abs(g.astype(int) - w.astype(int)).ravel() for g, w in zip(got, want, strict=True)]
    )
    worst, frac = int(diff.max()), float((diff > 0).mean())
    assert worst <= MAX_LEVELS and frac <= MAX_FRACTION, (
        f"{what}: max |fused - dali| = {worst} levels, {frac:.2%} of values differ"
    )


params = ca.param_vector


@pytest.mark.parametrize("order", list(permutations(range(3))), ids=str)
def test_colour_jitter_matches_dali_in_every_order(order):
    from fastclr.pipelines.dali.graph import jitter_step

    rng = np.random.default_rng(sum(o * 3**k for k, o in enumerate(order)))
    images = smooth_images(1)
    strengths = [
        (*rng.uniform(0.2, 1.8, size=3), rng.uniform(-72, 72)) for _ in images
    ]  # brightness, contrast, saturation, hue (degrees): SimCLR's ranges at s = 1

    def graph(img, *bcsh):
        for op in order:
            img = jitter_step(img, op, *bcsh)
        return img

    want = dali_ops(images, strengths, graph)
    ps = [params(order, brightness=b, contrast=c, saturation=s, hue=h) for b, c, s, h in strengths]
    assert_close(fused(images, ps), want, f"colour jitter in order {order}")


def test_each_colour_step_matches_dali_alone():
    """One step at a time: the other two steps get strengths that are exact identities in both."""
    from fastclr.pipelines.dali.graph import jitter_step

    images = smooth_images(2)
    for op, strength in [(0, (1.6, 1, 1, 0)), (1, (1, 0.3, 1, 0)), (2, (1, 1, 1.7, 50))]:
        want = dali_ops(
            images, [strength] * len(images), lambda img, *a, op=op: jitter_step(img, op, *a)
        )
        b, c, s, h = strength
        steps = (op, 0, 1) if op == 2 else (op, 1 - op, 1 - op)
        p = params(steps, brightness=b, contrast=c, saturation=s, hue=h)
        assert_close(fused(images, [p] * len(images)), want, f"colour step {op}")


def test_gpu_contrast_arithmetic_equals_fn_contrast_value_for_value():
    """The GPU graph's contrast (DALI arithmetic, so that the mean luma stays on the GPU) against
    DALI's own ``fn.contrast``, both run on the CPU: equal everywhere, ties and saturation included.

    A grey ramp of 256 pixels with mean luma exactly 127 (DALI's mean is exact there) makes
    ``c x + (1 - c) 127`` land on a half level for a quarter to a half of its values at these
    factors, so a different rounding of ties shows; its ends leave [0, 255] at c = 1.5.
    """
    from nvidia.dali import fn

    from fastclr.pipelines.dali.graph import contrast_arithmetic, mean_luma

    rng = np.random.default_rng(7)
    levels = np.arange(256, dtype=np.uint8)
    levels[-1] = 127  # sum 32512 = 127 * 256
    ramp = levels.reshape(16, 16, 1).repeat(3, axis=2)
    ramp_factors = [0.5, 1.5, 0.25]
    images = [ramp] * 3 + noise_images(7) + smooth_images(7)
    images.append(rng.integers(0, 256, (1, 1, 3), np.uint8))
    factors = [(c,) for c in [*ramp_factors, 0.0, 2.0, *rng.uniform(0, 2, len(images) - 5)]]

    def both(img, c):
        mean = mean_luma(img)
        return (
            contrast_arithmetic(img, c, mean),
            fn.contrast(img, contrast=c, contrast_center=mean),
            mean,
        )

    got, want, means = dali_ops(images, factors, both)
    assert all(m == 127 for m in means[:3]), means[:3]
    x = levels.astype(np.float32)
    ties = [np.count_nonzero(np.modf(c * x + (127 - c * 127))[0] == 0.5) for c in ramp_factors]
    assert min(ties) >= 64, ties
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        bad = np.argwhere(g != w)
        first = tuple(bad[0].tolist()) if len(bad) else None
        assert g.dtype == w.dtype == np.uint8 and first is None, (
            f"image {i} (c = {factors[i][0]:.3f}): {len(bad)} of {w.size} values differ, first at "
            f"{first}: arithmetic {g[first]} vs fn.contrast {w[first]}"
        )


def test_grayscale_matches_dali():
    from fastclr.pipelines.dali.graph import grayscale

    images = smooth_images(3)
    assert_close(
        fused(images, [params(gray=1)] * len(images)),
        dali_ops(images, [(0.0,)] * len(images), lambda img, _: grayscale(img)),
        "grayscale",
    )


def test_solarize_equals_dali_exactly():
    """A lookup table, no rounding: every one of the 256 levels maps exactly as in DALI."""
    from fastclr.pipelines.dali.graph import solarize

    levels = [np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)]
    (got,) = fused(levels, [params(solarize=1)])
    (want,) = dali_ops(levels, [(0.0,)], lambda img, _: solarize(img))
    assert np.array_equal(got, want), np.flatnonzero(got[..., 0] != want[..., 0])


@pytest.mark.parametrize("max_window", [23, 7])
def test_blur_matches_dali(max_window):
    """Window ``min(2 ceil(3 sigma) + 1, max_window)``, reflect-101 borders, one rounding."""
    from nvidia.dali import fn, types

    images = noise_images(4)
    sigmas = [0.1, 0.7, 1.3, 2.0]
    windows = [min(2 * int(np.ceil(3 * s)) + 1, max_window) for s in sigmas]
    want = dali_ops(
        images,
        list(zip(sigmas, windows, strict=True)),
        lambda img, s, w: fn.gaussian_blur(img, window_size=fn.cast(w, dtype=types.INT32), sigma=s),
    )
    got = fused(images, [params(blur=1, sigma=s, window=max_window) for s in sigmas])
    assert_close(got, want, f"blur, window at most {max_window}")


def test_every_op_off_is_the_identity_and_ops_compose_in_graph_order():
    images = smooth_images(5)
    assert all(
        np.array_equal(g, i) for g, i in zip(fused(images, [params()] * 4), images, strict=True)
    )
    # grayscale, then blur, then solarize: the same as applying them one after another
    all_on = params(gray=1, blur=1, sigma=1.5, window=23, solarize=1)
    step_by_step = images
    for p in [params(gray=1), params(blur=1, sigma=1.5, window=23), params(solarize=1)]:
        step_by_step = fused(step_by_step, [p] * 4)
    got = fused(images, [all_on] * 4)
    assert all(np.array_equal(g, s) for g, s in zip(got, step_by_step, strict=True))


def test_tiny_images_and_one_pixel_sides_do_not_crash():
    rng = np.random.default_rng(6)
    for h, w in [(1, 1), (1, 9), (9, 1), (2, 3)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        jitter = dict(brightness=1.3, contrast=0.6, saturation=1.2, hue=10)
        p = params((2, 1, 0), **jitter, gray=1, blur=1, sigma=2.0, window=23, solarize=1)
        (out,) = fused([img], [p])
        assert out.shape == img.shape


def test_bench_times_every_op_on_both_sides(tmp_path):
    from fastclr.bench import bench_cpu_augment

    out = tmp_path / "ops.csv"
    rows = bench_cpu_augment.main(
        ["--size", "24", "--batch", "2", "--repeats", "1", "--csv", str(out)]
    )
    assert [r["op"] for r in rows][:3] == ["colour jitter (3 steps)", "grayscale", "solarize"]
    assert all(r["numba_ms"] > 0 and r["dali_ms"] >= 0 for r in rows)
    assert len(out.read_text().splitlines()) == 1 + len(rows)
    with pytest.raises(SystemExit, match="positive"):
        bench_cpu_augment.main(["--batch", "0", "--csv", str(out)])
