"""The per-view pixel augmentation of the CPU pipeline as one numba-compiled DALI op.

After crop and resize, a SimCLR view goes through colour jitter (p), grayscale (p), Gaussian blur
(p) and solarize (p). DALI's own CPU ops do that in up to seven passes over the image (luma,
mean, contrast, brightness, hsv, grayscale, blur), each of them slow on the CPU: at 224 px the
augmentation costs more than decoding (bench/bench_cpu_augment.py). Here one ``numba_function``
op per view does all of it on a planar float32 copy of the view, with the same math and the same
rounding as those ops:

- brightness ``b``:  ``x <- sat(round(b x))``
- contrast ``c``:    ``x <- sat(round(c x + (1 - c) m))``, ``m`` = mean of ``sat(round(Y(x)))``
  over the image as it is at that step, ``Y = 0.299 R + 0.587 G + 0.114 B``
- saturation ``s`` and hue ``h`` (one step):  ``x <- sat(round(M x))`` with
  ``M = YIQ2RGB . R(h) . diag(1, s, s) . RGB2YIQ`` (DALI's ``hsv``: a rotation and a scaling of
  the chroma plane, which commute)
- the three colour steps in the order the sample drew (one of 6), rounding to uint8 between steps
- grayscale:  ``x <- sat(round(Y(x)))`` in all three channels
- blur:  separable Gaussian of ``sigma``, ``min(2 ceil(3 sigma) + 1, window)`` taps,
  reflect-101 borders, float between the two passes
- solarize:  ``x <- 255 - x`` where ``x >= 128``

``sat(round(.))`` rounds half to even, as DALI's ops do on the GPU (on the CPU they round ties
away from zero), and clamps to [0, 255]. Each op runs only where the sample's coin came up: the
coins and the strengths are drawn in the DALI graph (so they follow the pipeline's seed) and
reach the op as one float vector per sample, laid out as ``P_*`` below.

The GPU pipeline keeps DALI's own ops, which are fast there; ``augment_impl="dali"`` runs that
graph on the CPU too, and tests/test_cpu_augment.py checks that the two agree pixel for pixel
up to rounding.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import carray, cfunc, njit
from numba import types as nbt
from numba.core import cgutils
from numba.extending import intrinsic

from fastclr.pipelines.augment import SOLARIZE_THRESHOLD

# Per-sample parameter vector (float32), built by graph.fused_params.
P_COLOR, P_STEPS, P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE = 0, 1, 4, 5, 6, 7
P_GRAY, P_BLUR, P_SIGMA, P_WINDOW, P_SOLARIZE = 8, 9, 10, 11, 12
NUM_PARAMS = 13
BRIGHTNESS, CONTRAST, SATURATION_HUE = 0, 1, 2  # colour steps, as P_STEPS..P_STEPS+2 name them


def param_vector(steps=None, **values) -> np.ndarray:
    """A params vector by name, e.g. ``param_vector((1, 0, 2), brightness=1.2)``: ``steps``
    switches colour jitter on with that order of steps; ``gray=1`` etc. switch the other ops on.
    """
    p = np.zeros(NUM_PARAMS, np.float32)
    for name, value in values.items():
        p[globals()[f"P_{name.upper()}"]] = value
    if steps is not None:
        p[P_COLOR], p[P_STEPS : P_STEPS + 3] = 1, steps
    return p


# DALI's RGB -> YIQ matrix; its hsv op maps back with the exact inverse (so s = 1, h = 0 is the
# identity).
RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
YIQ2RGB = np.linalg.inv(RGB2YIQ)
LUMA = (0.299, 0.587, 0.114)


# The ops work on a planar float32 copy of the view, (3, H * W): every op's inner loop is then
# contiguous and vectorises. Values stay integers in [0, 255] between ops (_clip_round after
# each), so this is the uint8 arithmetic of DALI's ops, without a uint8 round trip per op.


@njit(cache=True)
def _clip_round(v):
    return min(max(np.rint(v), np.float32(0.0)), np.float32(255.0))


@njit(cache=True)
def _luma(f, i):
    return (
        np.float32(LUMA[0]) * f[0, i]
        + np.float32(LUMA[1]) * f[1, i]
        + np.float32(LUMA[2]) * f[2, i]
    )


@njit(cache=True)
def _affine(f, scale, shift):
    for c in range(3):
        plane = f[c]
        for i in range(plane.size):
            plane[i] = _clip_round(plane[i] * scale + shift)


@njit(cache=True)
def _mean_luma(f):
    total = 0
    for i in range(f.shape[1]):
        total += np.int32(_clip_round(_luma(f, i)))
    return np.float32(total / max(f.shape[1], 1))


@njit(cache=True)
def _chroma_matrix(saturation, hue_deg):
    h = hue_deg * math.pi / 180.0
    rotate_scale = np.eye(3)
    rotate_scale[1, 1] = rotate_scale[2, 2] = math.cos(h) * saturation
    rotate_scale[1, 2] = math.sin(h) * saturation
    rotate_scale[2, 1] = -math.sin(h) * saturation
    return (YIQ2RGB @ rotate_scale @ RGB2YIQ).astype(np.float32)


@njit(cache=True)
def _color_matrix(f, m):
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.ravel()
    for i in range(f.shape[1]):
        r, g, b = f[0, i], f[1, i], f[2, i]
        f[0, i] = _clip_round(m00 * r + m01 * g + m02 * b)
        f[1, i] = _clip_round(m10 * r + m11 * g + m12 * b)
        f[2, i] = _clip_round(m20 * r + m21 * g + m22 * b)


@njit(cache=True)
def _grayscale(f):
    for i in range(f.shape[1]):
        f[0, i] = f[1, i] = f[2, i] = _clip_round(_luma(f, i))


@njit(cache=True)
def _reflect101(i, n):
    """Index ``i`` folded into [0, n) by reflection without repeating the edge (dcb|abcd|cba)."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i = abs(i) % period
    return period - i if i >= n else i


@njit(cache=True)
def _gaussian_taps(sigma, max_window):
    window = min(2 * math.ceil(3.0 * sigma) + 1, max_window)
    radius = window // 2
    taps = np.empty(window, np.float32)
    for t in range(window):
        taps[t] = math.exp(-((t - radius) ** 2) / (2.0 * sigma * sigma))
    return taps / taps.sum()


@njit(cache=True)
def _blur(f, h, w, sigma, max_window):
    taps = _gaussian_taps(sigma, max_window)
    radius = taps.size // 2
    padded = np.empty(w + 2 * radius, np.float32)
    rows = np.empty((h, w), np.float32)  # one channel after the horizontal pass
    for c in range(3):
        img = f[c].reshape(h, w)
        for y in range(h):
            padded[radius : radius + w] = img[y]
            for j in range(radius):  # only the borders need folding
                padded[j] = img[y, _reflect101(j - radius, w)]
                padded[radius + w + j] = img[y, _reflect101(w + j, w)]
            out = rows[y]
            out[:] = 0.0
            for t in range(taps.size):  # tap-outer, pixel-inner: contiguous, vectorisable
                k = taps[t]
                for j in range(w):
                    out[j] += k * padded[j + t]
        for y in range(h):
            out = img[y]
            out[:] = 0.0
            for t in range(taps.size):
                k, src = taps[t], rows[_reflect101(y + t - radius, h)]
                for j in range(w):
                    out[j] += k * src[j]
            for j in range(w):
                out[j] = _clip_round(out[j])


@njit(cache=True)
def _solarize(f):
    for c in range(3):
        plane = f[c]
        for i in range(plane.size):
            if plane[i] >= SOLARIZE_THRESHOLD:
                plane[i] = 255.0 - plane[i]


@njit(cache=True)
def augment_pixels(x, h, w, p):
    """Augment one view in place: ``x`` is its (h * w * 3,) uint8 HWC pixels, ``p`` its params."""
    color, gray = p[P_COLOR] > 0.5, p[P_GRAY] > 0.5
    blur, solarize = p[P_BLUR] > 0.5, p[P_SOLARIZE] > 0.5
    if not (color or gray or blur or solarize):
        return
    n = h * w
    f = np.empty((3, n), np.float32)
    for i in range(n):
        f[0, i], f[1, i], f[2, i] = x[3 * i], x[3 * i + 1], x[3 * i + 2]
    if color:
        for step in range(3):
            op = int(p[P_STEPS + step])
            if op == BRIGHTNESS:
                _affine(f, np.float32(p[P_BRIGHTNESS]), np.float32(0.0))
            elif op == CONTRAST:
                c = np.float32(p[P_CONTRAST])
                _affine(f, c, (np.float32(1.0) - c) * _mean_luma(f))
            else:
                _color_matrix(f, _chroma_matrix(p[P_SATURATION], p[P_HUE]))
    if gray:
        _grayscale(f)
    if blur:
        _blur(f, h, w, p[P_SIGMA], int(p[P_WINDOW]))
    if solarize:
        _solarize(f)
    for i in range(n):
        x[3 * i], x[3 * i + 1], x[3 * i + 2] = (
            np.uint8(f[0, i]),
            np.uint8(f[1, i]),
            np.uint8(f[2, i]),
        )


# DALI's numba_function op calls C functions by address. Its Python wrapper compiles generic
# glue for up to six inputs and outputs on every construction (~6 s); these two cfuncs have
# exactly the op's C signatures (dali/operators/numba_function/numba_func.cc) for our one
# image-plus-params case, and numba caches them on disk, so a new process loads them instead.
@intrinsic
def _pointer(typingctx, address):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return nbt.voidptr(address), codegen


_U64, _I32 = nbt.uint64, nbt.int32


@cfunc(nbt.void(_U64, _U64, _U64, _I32, _U64, _U64, _U64, _I32), cache=True)
def _run_sample(out_ptrs, out_shapes, out_ndims, num_outs, in_ptrs, in_shapes, in_ndims, num_ins):
    """One sample: output 0 (H, W, 3) uint8 <- input 0 (H, W, 3) uint8 augmented by input 1."""
    shape = carray(_pointer(carray(_pointer(in_shapes), 2, dtype=np.uint64)[0]), 3, dtype=np.int64)
    h, w = shape[0], shape[1]
    ins = carray(_pointer(in_ptrs), 2, dtype=np.uint64)
    out = carray(_pointer(carray(_pointer(out_ptrs), 1, dtype=np.uint64)[0]), h * w * 3, np.uint8)
    out[:] = carray(_pointer(ins[0]), h * w * 3, dtype=np.uint8)
    augment_pixels(out, h, w, carray(_pointer(ins[1]), NUM_PARAMS, dtype=np.float32))


@cfunc(nbt.void(_U64, _U64, _I32, _U64, _U64, _I32, _I32), cache=True)
def _setup_batch(out_shapes, out_ndims, num_outs, in_shapes, in_ndims, num_ins, num_samples):
    """Output 0 of each sample has the shape of its input 0."""
    outs = carray(_pointer(out_shapes), num_samples, dtype=np.uint64)
    ins = carray(_pointer(in_shapes), num_samples, dtype=np.uint64)  # input 0's come first
    for i in range(num_samples):
        carray(_pointer(outs[i]), 3, dtype=np.int64)[:] = carray(_pointer(ins[i]), 3, np.int64)


@functools.cache
def augment_op():
    """The DALI op ``(images uint8 (H, W, 3), params float32 (NUM_PARAMS,)) -> images``.

    Built once per process and reused by every pipeline (each epoch builds a fresh one).
    """
    from nvidia.dali import types
    from nvidia.dali.plugin.numba import NumbaFunction

    class AugmentOp(NumbaFunction):
        def _get_run_fn_cpu(self, *args):
            return _run_sample.address

        def _get_setup_fn_cpu(self, *args):
            return _setup_batch.address

    return AugmentOp(
        run_fn=None,
        setup_fn=None,
        out_types=[types.UINT8],
        in_types=[types.UINT8, types.FLOAT],
        outs_ndim=[3],
        ins_ndim=[3, 1],
        device="cpu",
    )
