"""Single-pass C loops for the CPU fake-quantization kernels, built with the system C compiler.

The eager kernels of :mod:`qdetr.quant.kernels` run each formula as a chain of PyTorch
operations, every one a pass over memory. On CPU, where these elementwise passes are bound by
memory traffic, the loops below do the same arithmetic in one pass per call:

* forward: read ``x`` once, write ``x̂`` once;
* backward: read ``x`` and the incoming gradient once, write the input gradient (in place
  when the caller allows it) and accumulate the per-step sums of the step / zero-point
  gradients in float64.

The arithmetic is the eager kernels' operation for operation (``x / s``, ``+ round(z)``, clamp,
round half to even, ``- round(z)``, ``* s``), compiled without floating-point contraction
(``-ffp-contract=off``, no fast-math), so forward outputs and input / weight gradients are
bit-identical to the eager kernels; step and zero-point gradients are the same sums in
another order (float64 accumulation).

The C source is compiled once per machine, on first use, into
``<qdetr cache>/kernels/fake_quant-<hash>.so`` (``$QDETR_CACHE``, default ``~/.cache/qdetr``)
and loaded with :mod:`ctypes`; building takes about a second. Where no C compiler works the
loader logs one line and the eager kernels are used. Only contiguous float32 / float64 CPU
tensors whose steps broadcast along one channel axis take this path; everything else stays
eager. With ``torch.get_num_threads() > 1`` large tensors are split across that many Python
threads (the loops run without the GIL).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from qdetr.quant.reusable_buffers import ReusableBuffers

__all__ = ["native_kernels_available", "native_build_error"]

_log = logging.getLogger(__name__)

# One template, instantiated for float (f32) and double (f64), for activations (HAS_Z 1: LSQ+
# with a zero point) and weights (HAS_Z 0). Tensors are (P, C, Q) row-major, the steps indexed
# by C. Work is split over "rows": (p, c) pairs when Q > 1, whole p slices when Q == 1 (then
# the inner loop runs over channels, which vectorizes). acc holds float64 per-channel sums.
_C_SOURCE = r"""
#include <math.h>
#include <stdint.h>

#define CLAMP(v, lo, hi) ((v) < (lo) ? (lo) : ((v) > (hi) ? (hi) : (v)))
/* Round half to even for |v| < 2^23 (float) / 2^52 (double), the clamped range: adding and
   subtracting 2^23 rounds |v| to an integer in the default rounding mode; copysign keeps
   the sign of zero as nearbyint does (round(-0.3) == -0.0). Vectorizes without SSE4.1. */
#define RND_F32(v) copysignf((fabsf(v) + 8388608.0f) - 8388608.0f, (v))
#define RND_F64(v) copysign((fabs(v) + 4503599627370496.0) - 4503599627370496.0, (v))

/* Step sums are accumulated in the data's type over blocks of at most BLOCK elements of a row
   (ROWS rows of a channel vector), then added to the float64 accumulators. */
#define BLOCK 512
#define ROWS 64

#define DEFINE_KERNELS(T, SUF, RND)                                                           \
void fq_act_fwd_##SUF(const T* x, T* out, const T* s, const T* zr, int64_t C, int64_t Q,     \
                      int64_t r0, int64_t r1, T qn, T qp) {                                  \
    if (Q == 1) {                                                                            \
        for (int64_t p = r0; p < r1; ++p) {                                                  \
            const T* xp = x + p * C; T* op = out + p * C;                                    \
            _Pragma("omp simd")                                                              \
            for (int64_t c = 0; c < C; ++c) {                                                \
                T v = xp[c] / s[c] + zr[c];                                                  \
                v = CLAMP(v, qn, qp);                                                        \
                op[c] = (RND(v) - zr[c]) * s[c];                                             \
            }                                                                                \
        }                                                                                    \
        return;                                                                              \
    }                                                                                        \
    for (int64_t r = r0; r < r1; ++r) {                                                      \
        const int64_t c = r % C; const T sc = s[c], z = zr[c];                               \
        const T* xr = x + r * Q; T* orow = out + r * Q;                                      \
        _Pragma("omp simd")                                                                  \
        for (int64_t i = 0; i < Q; ++i) {                                                    \
            T v = xr[i] / sc + z;                                                            \
            v = CLAMP(v, qn, qp);                                                            \
            orow[i] = (RND(v) - z) * sc;                                                     \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
void fq_act_bwd_##SUF(const T* x, const T* g, T* gx, const T* s, const T* zr, int64_t C,     \
                      int64_t Q, int64_t r0, int64_t r1, T qn, T qp, double* acc) {          \
    double* acc_clip = acc; double* acc_d = acc + C;                                         \
    if (Q == 1) {                                                                            \
        T fclip[BLOCK], fd[BLOCK];                                                           \
        for (int64_t c0 = 0; c0 < C; c0 += BLOCK) {                                          \
            const int64_t nc = (C - c0 < BLOCK) ? C - c0 : BLOCK;                            \
            for (int64_t p0 = r0; p0 < r1; p0 += ROWS) {                                     \
                const int64_t p1 = (r1 - p0 < ROWS) ? r1 : p0 + ROWS;                        \
                for (int64_t c = 0; c < nc; ++c) { fclip[c] = 0; fd[c] = 0; }                \
                for (int64_t p = p0; p < p1; ++p) {                                          \
                    const T* xp = x + p * C + c0; const T* gp = g + p * C + c0;              \
                    T* gxp = gx + p * C + c0; const T* sp = s + c0; const T* zp = zr + c0;   \
                    _Pragma("omp simd")                                                      \
                    for (int64_t c = 0; c < nc; ++c) {                                       \
                        T v = xp[c] / sp[c] + zp[c];                                         \
                        T q = CLAMP(v, qn, qp);                                              \
                        T inside = (v == q) ? (T)1 : (T)0;                                   \
                        T gi = gp[c];                                                        \
                        T gout = gi * inside;                                                \
                        T d = RND(q) - inside * q;                                           \
                        fclip[c] += gi - gout; fd[c] += d * gi;                              \
                        gxp[c] = gout;                                                       \
                    }                                                                        \
                }                                                                            \
                for (int64_t c = 0; c < nc; ++c) {                                           \
                    acc_clip[c0 + c] += (double)fclip[c]; acc_d[c0 + c] += (double)fd[c];    \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        return;                                                                              \
    }                                                                                        \
    for (int64_t r = r0; r < r1; ++r) {                                                      \
        const int64_t c = r % C; const T sc = s[c], z = zr[c];                               \
        const T* xr = x + r * Q; const T* gr = g + r * Q; T* gxr = gx + r * Q;               \
        double sclip = 0.0, sd = 0.0;                                                        \
        for (int64_t i0 = 0; i0 < Q; i0 += BLOCK) {                                          \
            const int64_t i1 = (Q - i0 < BLOCK) ? Q : i0 + BLOCK;                            \
            T fclip = 0, fd = 0;                                                             \
            _Pragma("omp simd reduction(+:fclip,fd)")                                        \
            for (int64_t i = i0; i < i1; ++i) {                                              \
                T v = xr[i] / sc + z;                                                        \
                T q = CLAMP(v, qn, qp);                                                      \
                T inside = (v == q) ? (T)1 : (T)0;                                           \
                T gi = gr[i];                                                                \
                T gout = gi * inside;                                                        \
                T d = RND(q) - inside * q;                                                   \
                fclip += gi - gout; fd += d * gi;                                            \
                gxr[i] = gout;                                                               \
            }                                                                                \
            sclip += (double)fclip; sd += (double)fd;                                        \
        }                                                                                    \
        acc_clip[c] += sclip; acc_d[c] += sd;                                                \
    }                                                                                        \
}                                                                                            \
                                                                                             \
void fq_act_finalize_##SUF(const double* acc, const T* s, const T* zr, int64_t C, T* gs, T* gz) { \
    /* grad_s = sum(g * d) - round(z) * clipped, grad_z = -s * clipped, clipped = sum of g  \
       over the clipped elements */                                                          \
    for (int64_t c = 0; c < C; ++c) {                                                        \
        T clipped = (T)acc[c];                                                               \
        gs[c] = (T)acc[C + c] - zr[c] * clipped;                                             \
        gz[c] = -s[c] * clipped;                                                             \
    }                                                                                        \
}                                                                                            \
                                                                                             \
void fq_w_fwd_##SUF(const T* w, T* out, const T* s, int64_t C, int64_t Q,                   \
                    int64_t r0, int64_t r1, T qn, T qp) {                                    \
    if (Q == 1) {                                                                            \
        for (int64_t p = r0; p < r1; ++p) {                                                  \
            const T* wp = w + p * C; T* op = out + p * C;                                    \
            _Pragma("omp simd")                                                              \
            for (int64_t c = 0; c < C; ++c) {                                                \
                T v = wp[c] / s[c];                                                          \
                v = CLAMP(v, qn, qp);                                                        \
                op[c] = RND(v) * s[c];                                                       \
            }                                                                                \
        }                                                                                    \
        return;                                                                              \
    }                                                                                        \
    for (int64_t r = r0; r < r1; ++r) {                                                      \
        const int64_t c = r % C; const T sc = s[c];                                          \
        const T* wr = w + r * Q; T* orow = out + r * Q;                                      \
        _Pragma("omp simd")                                                                  \
        for (int64_t i = 0; i < Q; ++i) {                                                    \
            T v = wr[i] / sc;                                                                \
            v = CLAMP(v, qn, qp);                                                            \
            orow[i] = RND(v) * sc;                                                           \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
void fq_w_bwd_##SUF(const T* w, const T* g, T* gw, const T* s, int64_t C, int64_t Q,        \
                    int64_t r0, int64_t r1, T qn, T qp, double* acc) {                       \
    if (Q == 1) {                                                                            \
        T fd[BLOCK];                                                                         \
        for (int64_t c0 = 0; c0 < C; c0 += BLOCK) {                                          \
            const int64_t nc = (C - c0 < BLOCK) ? C - c0 : BLOCK;                            \
            for (int64_t p0 = r0; p0 < r1; p0 += ROWS) {                                     \
                const int64_t p1 = (r1 - p0 < ROWS) ? r1 : p0 + ROWS;                        \
                for (int64_t c = 0; c < nc; ++c) fd[c] = 0;                                  \
                for (int64_t p = p0; p < p1; ++p) {                                          \
                    const T* wp = w + p * C + c0; const T* gp = g + p * C + c0;              \
                    T* gwp = gw + p * C + c0; const T* sp = s + c0;                          \
                    _Pragma("omp simd")                                                      \
                    for (int64_t c = 0; c < nc; ++c) {                                       \
                        T v = wp[c] / sp[c];                                                 \
                        T q = CLAMP(v, qn, qp);                                              \
                        T inside = (v == q) ? (T)1 : (T)0;                                   \
                        T gi = gp[c];                                                        \
                        T d = RND(q) - inside * q;                                           \
                        fd[c] += d * gi;                                                     \
                        gwp[c] = gi * inside;                                                \
                    }                                                                        \
                }                                                                            \
                for (int64_t c = 0; c < nc; ++c) acc[c0 + c] += (double)fd[c];               \
            }                                                                                \
        }                                                                                    \
        return;                                                                              \
    }                                                                                        \
    for (int64_t r = r0; r < r1; ++r) {                                                      \
        const int64_t c = r % C; const T sc = s[c];                                          \
        const T* wr = w + r * Q; const T* gr = g + r * Q; T* gwr = gw + r * Q;               \
        double sd = 0.0;                                                                     \
        for (int64_t i0 = 0; i0 < Q; i0 += BLOCK) {                                          \
            const int64_t i1 = (Q - i0 < BLOCK) ? Q : i0 + BLOCK;                            \
            T fd = 0;                                                                        \
            _Pragma("omp simd reduction(+:fd)")                                              \
            for (int64_t i = i0; i < i1; ++i) {                                              \
                T v = wr[i] / sc;                                                            \
                T q = CLAMP(v, qn, qp);                                                      \
                T inside = (v == q) ? (T)1 : (T)0;                                           \
                T gi = gr[i];                                                                \
                T d = RND(q) - inside * q;                                                   \
                fd += d * gi;                                                                \
                gwr[i] = gi * inside;                                                        \
            }                                                                                \
            sd += (double)fd;                                                                \
        }                                                                                    \
        acc[c] += sd;                                                                        \
    }                                                                                        \
}

DEFINE_KERNELS(float, f32, RND_F32)
DEFINE_KERNELS(double, f64, RND_F64)
"""

# -O3 with SIMD pragmas; no fast-math and no contraction, so every operation rounds exactly as
# PyTorch's vectorized kernels do (IEEE division and the rounding above). -march=native (the
# widest vectors of this CPU: 2-3x faster than the baseline instruction set here) when the
# compiler accepts it; the cache key includes the CPU's feature flags, so a cache directory
# shared between machines never hands one CPU another's build.
_CFLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno"]
_NATIVE_FLAGS = ["-march=native"]

_state: dict = {"lib": None, "error": None, "tried": False}
_lock = threading.Lock()
_pool: dict = {}

#: Tensors with fewer elements than this run in the calling thread whatever the thread count.
PARALLEL_MIN_NUMEL = 1 << 16

#: Memory for the forward outputs. ``QuantConv2d`` / ``QuantLinear`` keep neither x̂ nor ŵ:
#: both live until the conv / linear that reads them returns and are recomputed for its
#: backward, where they live for one autograd node. Reusable buffers per thread (x̂ and ŵ at
#: once, in a few size classes: a buffer serves requests down to a quarter of its size) serve
#: them without the page faults of fresh memory (see :mod:`qdetr.quant.reusable_buffers`);
#: outputs that someone keeps get fresh memory.
OUTPUTS = ReusableBuffers(max_buffers=6, max_oversize=4)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    """The CPU's model and feature flags (Linux), else the platform string."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.platform() + platform.processor()


def _library_path(cache_dir: Path, compiler: str, flags: list[str]) -> Path:
    parts = [_C_SOURCE, compiler, *flags, platform.machine(), _cpu_identity()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return cache_dir / "kernels" / f"fake_quant-{key}.so"


def _compile(compiler: str, flags: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src, out = Path(tmp) / "fake_quant.c", Path(tmp) / "fake_quant.so"
        src.write_text(_C_SOURCE)
        proc = subprocess.run([compiler, *flags, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
            raise RuntimeError(f"{Path(compiler).name} failed: {last[0]}")
        os.replace(out, path)  # atomic: concurrent builders leave one complete file


def _build(cache_dir: Path | None = None) -> ctypes.CDLL:
    """Compile (once; cached by source hash) and load the kernel library."""
    from qdetr.zoo.cache import default_cache_dir  # lazy: qdetr.zoo imports qdetr.quant

    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc / clang)")
    root = cache_dir or default_cache_dir()
    path = None
    for flags in (_CFLAGS + _NATIVE_FLAGS, _CFLAGS):  # without -march=native if it is refused
        candidate = _library_path(root, compiler, flags)
        if candidate.exists():
            path = candidate
            break
        try:
            _compile(compiler, flags, candidate)
        except RuntimeError:
            if flags is _CFLAGS:
                raise
            continue
        path = candidate
        break
    lib = ctypes.CDLL(str(path))
    i64 = ctypes.c_int64
    ptr = ctypes.c_void_p
    for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        getattr(lib, f"fq_act_fwd_{suffix}").argtypes = [ptr] * 4 + [i64] * 4 + [real] * 2
        getattr(lib, f"fq_act_bwd_{suffix}").argtypes = [ptr] * 5 + [i64] * 4 + [real] * 2 + [ptr]
        getattr(lib, f"fq_act_finalize_{suffix}").argtypes = [ptr] * 3 + [i64] + [ptr] * 2
        getattr(lib, f"fq_w_fwd_{suffix}").argtypes = [ptr] * 3 + [i64] * 4 + [real] * 2
        getattr(lib, f"fq_w_bwd_{suffix}").argtypes = [ptr] * 4 + [i64] * 4 + [real] * 2 + [ptr]
        for kind in ("act_fwd", "act_bwd", "act_finalize", "w_fwd", "w_bwd"):
            getattr(lib, f"fq_{kind}_{suffix}").restype = None
    return lib


def _library() -> ctypes.CDLL | None:
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if not _state["tried"]:
            try:
                _state["lib"] = _build()
            except Exception as exc:  # no compiler, read-only cache, exotic platform: stay eager
                _state["error"] = f"{type(exc).__name__}: {exc}"
                _log.warning("qdetr: native fake-quant kernels unavailable (%s); using eager kernels", _state["error"])
            _state["tried"] = True
    return _state["lib"]


def native_kernels_available() -> bool:
    """Whether the native CPU kernels are built and loaded (builds them on the first call).

    Examples:
        >>> native_kernels_available() in (True, False)
        True
    """
    return _library() is not None


def native_build_error() -> str | None:
    """Why the native kernels are unavailable (``None`` when they loaded or were never tried).

    Examples:
        >>> native_build_error() is None or isinstance(native_build_error(), str)
        True
    """
    return _state["error"]


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _layout(big: list[torch.Tensor], small: list[torch.Tensor]):
    """``(P, C, Q)`` of the data tensors and the steps as contiguous (C,) tensors, or None where
    the native loops do not apply (non-CPU, other dtypes, non-contiguous, steps that do not
    broadcast along exactly one axis, autograd recording, torch.compile tracing).

    Called for every fake-quantization kernel: written for low per-call overhead."""
    ref = big[0]
    dtype, shape = ref.dtype, ref.shape
    if dtype not in _SUFFIX or ref.device.type != "cpu" or ref.numel() == 0:
        return None
    if torch._C._is_tracing():  # torch.jit.trace records aten ops, not C calls
        return None
    grad_mode = torch.is_grad_enabled()
    for t in big:
        if t.dtype != dtype or t.shape != shape or not t.is_contiguous() or (grad_mode and t.requires_grad):
            return None
        if type(t) not in _PLAIN_TENSORS:  # fake / functional tensors of torch.export and friends
            return None
    s = small[0]
    sshape = s.shape
    for t in small:
        if t.dtype != dtype or t.shape != sshape or t.device.type != "cpu" or (grad_mode and t.requires_grad):
            return None
        if type(t) not in _PLAIN_TENSORS:
            return None
    if torch.compiler.is_compiling():
        return None
    ndim, sdim = len(shape), len(sshape)
    if sdim > ndim:
        return None
    axis = -1
    for i in range(sdim):
        if sshape[i] != 1:
            if axis >= 0:
                return None  # steps along two axes
            axis = i + ndim - sdim
            if sshape[i] != shape[axis]:
                return None
    dims = rows_layout(ref, axis if axis >= 0 else None)
    c = dims[1]
    return dims, [t.reshape(c) if t.is_contiguous() else t.reshape(c).contiguous() for t in small]


def rows_layout(x: torch.Tensor, axis: int | None) -> tuple[int, int, int]:
    """``(P, C, Q)`` of a contiguous ``x`` whose steps run along ``axis`` (None: one step for all).

    Examples:
        >>> rows_layout(torch.empty(2, 6, 7, 9), 1), rows_layout(torch.empty(4, 5, 12), 2)
        ((2, 6, 63), (20, 12, 1))
    """
    if axis is None:
        return 1, 1, x.numel()
    c = x.shape[axis]
    q = 1
    for n in x.shape[axis + 1 :]:
        q *= n
    return x.numel() // (c * q), c, q


def _exact_range(qn: int, qp: int) -> bool:
    """The loops' rounding is exact for clamped values below 2^22 in magnitude (any bit width <= 22)."""
    return max(abs(qn), abs(qp)) < (1 << 22)


def _run(fn, args_before: tuple, dims: tuple[int, int, int], args_after: tuple, acc: torch.Tensor | None) -> None:
    """Call ``fn(*args_before, C, Q, r0, r1, *args_after[, acc])`` over the rows, split across
    ``torch.get_num_threads()`` threads for large tensors (per-thread float64 accumulators)."""
    p, c, q = dims
    rows = p if q == 1 else p * c
    threads = min(torch.get_num_threads(), rows)
    if threads <= 1 or p * c * q < PARALLEL_MIN_NUMEL:
        extra = (acc.data_ptr(),) if acc is not None else ()
        fn(*args_before, c, q, 0, rows, *args_after, *extra)
        return
    pool = _pool.get(threads)
    if pool is None:
        pool = _pool[threads] = ThreadPoolExecutor(threads, thread_name_prefix="qdetr-fq")
    bounds = [rows * i // threads for i in range(threads + 1)]
    accs = None if acc is None else torch.zeros((threads, *acc.shape), dtype=torch.float64)
    futures = [
        pool.submit(fn, *args_before, c, q, bounds[i], bounds[i + 1], *args_after, *((accs[i].data_ptr(),) if accs is not None else ()))
        for i in range(threads)
    ]
    for f in futures:
        f.result()
    if acc is not None:
        acc += accs.sum(0)


def _memory_order(x: torch.Tensor) -> list[int] | None:
    """The permutation that makes a dense, non-overlapping ``x`` contiguous (None if there is none)."""
    perm = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
    return perm if x.permute(perm).is_contiguous() else None


def act_forward(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qn: int, qp: int) -> torch.Tensor | None:
    """Native ``kernels.act_forward``; None where it does not apply (see :func:`_layout`).

    A permuted view of a contiguous tensor (per-head q / k / v of shape (B, h, L, d_h) viewed
    from (B, L, h, d_h)) is quantized in memory order; the result has ``x``'s strides, as the
    eager kernels' result does."""
    if not x.is_contiguous() and x.dim() > 1 and x.device.type == "cpu" and x.numel() > 0 and s.dim() <= x.dim():
        perm = _memory_order(x)
        if perm is None:
            return None
        lead = [1] * (x.dim() - s.dim())
        s_p, z_p = (t.reshape(lead + list(t.shape)).permute(perm) for t in (s, z))
        out = act_forward(x.permute(perm), s_p, z_p, qn, qp)
        return None if out is None else out.permute([perm.index(d) for d in range(x.dim())])
    layout = _layout([x], [s, z]) if _exact_range(qn, qp) else None
    if layout is None or _library() is None:
        return None
    dims, (s1, z1) = layout
    return act_forward_rows(x, s1, torch.round(z1), dims, qn, qp)


def act_backward(x, s, z, grad, qn: int, qp: int, grad_in_place: bool):
    """Native ``kernels.act_backward``: ``(grad_x, grad_s, grad_z)`` or None."""
    layout = _layout([x, grad], [s, z]) if _exact_range(qn, qp) else None
    if layout is None or _library() is None:
        return None
    dims, (s1, z1) = layout
    grad_x, grad_s, grad_z = act_backward_rows(x, s1, torch.round(z1), grad, dims, qn, qp, grad_in_place)
    return grad_x, grad_s.view(s.shape), grad_z.view(s.shape)


def weight_forward(w: torch.Tensor, s: torch.Tensor, qn: int, qp: int) -> torch.Tensor | None:
    """Native ``kernels.weight_forward``; None where it does not apply."""
    layout = _layout([w], [s]) if _exact_range(qn, qp) else None
    if layout is None or _library() is None:
        return None
    dims, (s1,) = layout
    return weight_forward_rows(w, s1, dims, qn, qp)


def weight_backward(w, s, grad, qn: int, qp: int, grad_in_place: bool):
    """Native ``kernels.weight_backward``: ``(grad_w, grad_s)`` or None."""
    layout = _layout([w, grad], [s]) if _exact_range(qn, qp) else None
    if layout is None or _library() is None:
        return None
    dims, (s1,) = layout
    grad_w, grad_s = weight_backward_rows(w, s1, grad, dims, qn, qp, grad_in_place)
    return grad_w, grad_s.view(s.shape)


# The four loops on tensors already laid out as (P, C, Q): contiguous CPU float32 / float64
# data of one dtype, steps and rounded zero points as contiguous (C,) tensors of that dtype,
# an integer range below 2^22, and a loaded library. The functions above check all of this;
# callers that have checked it themselves (qdetr.quant.fused_layers) call these directly.


def act_forward_rows(x, s1, zr, dims: tuple[int, int, int], qn: int, qp: int) -> torch.Tensor:
    """``x̂`` of ``x`` (any shape, ``dims = (P, C, Q)``) with steps ``s1`` and rounded zero points ``zr`` (C,)."""
    out = OUTPUTS.empty(x.shape, x.dtype)
    fn = getattr(_state["lib"], f"fq_act_fwd_{_SUFFIX[x.dtype]}")
    _run(fn, (x.data_ptr(), out.data_ptr(), s1.data_ptr(), zr.data_ptr()), dims, (float(qn), float(qp)), None)
    return out


def act_backward_rows(x, s1, zr, grad, dims: tuple[int, int, int], qn: int, qp: int, grad_in_place: bool):
    """``(grad_x, grad_s, grad_z)``, the last two shaped (C,), before the LSQ gradient scale."""
    lib = _state["lib"]
    grad_x = grad if grad_in_place else torch.empty_like(grad)
    acc = torch.zeros(2, dims[1], dtype=torch.float64)
    suffix = _SUFFIX[x.dtype]
    ptrs = (x.data_ptr(), grad.data_ptr(), grad_x.data_ptr(), s1.data_ptr(), zr.data_ptr())
    _run(getattr(lib, f"fq_act_bwd_{suffix}"), ptrs, dims, (float(qn), float(qp)), acc)
    grad_s, grad_z = torch.empty(dims[1], dtype=x.dtype), torch.empty(dims[1], dtype=x.dtype)
    getattr(lib, f"fq_act_finalize_{suffix}")(
        acc.data_ptr(), s1.data_ptr(), zr.data_ptr(), dims[1], grad_s.data_ptr(), grad_z.data_ptr()
    )
    return grad_x, grad_s, grad_z


def weight_forward_rows(w, s1, dims: tuple[int, int, int], qn: int, qp: int) -> torch.Tensor:
    """``ŵ`` of ``w`` (any shape, ``dims = (P, C, Q)``) with steps ``s1`` (C,)."""
    out = OUTPUTS.empty(w.shape, w.dtype)
    fn = getattr(_state["lib"], f"fq_w_fwd_{_SUFFIX[w.dtype]}")
    _run(fn, (w.data_ptr(), out.data_ptr(), s1.data_ptr()), dims, (float(qn), float(qp)), None)
    return out


def weight_backward_rows(w, s1, grad, dims: tuple[int, int, int], qn: int, qp: int, grad_in_place: bool):
    """``(grad_w, grad_s)``, the latter shaped (C,), before the LSQ gradient scale."""
    grad_w = grad if grad_in_place else torch.empty_like(grad)
    acc = torch.zeros(dims[1], dtype=torch.float64)
    fn = getattr(_state["lib"], f"fq_w_bwd_{_SUFFIX[w.dtype]}")
    _run(fn, (w.data_ptr(), grad.data_ptr(), grad_w.data_ptr(), s1.data_ptr()), dims, (float(qn), float(qp)), acc)
    return grad_w, acc.to(w.dtype)
