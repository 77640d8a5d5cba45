"""Worker: the matrix-vector roofline of the MLX backend (what decode could reach)."""

from __future__ import annotations

import time

from .checkpoints import DTYPE_BYTES, INIT_STD, SEED


def run(a) -> dict:
    """Bandwidth of one plain matrix-vector product over `a.bytes` of weights, same backend and dtype."""
    import mlx.core as mx

    dt = getattr(mx, a.dtype)
    K = a.hidden
    rows = max(1, a.bytes // (K * DTYPE_BYTES[a.dtype]))
    W = (mx.random.normal((rows, K), key=mx.random.key(SEED)) * INIT_STD).astype(dt)
    x = mx.random.normal((1, K), key=mx.random.key(SEED + 1)).astype(dt)
    mx.eval(W, x)
    nbytes = rows * K * DTYPE_BYTES[a.dtype]
    best = {}
    forms = (("x @ W.T (nn.Linear)", lambda: x @ W.T), ("W @ x", lambda: W @ x[0]))
    for _round in range(3):  # interleaved rounds; keep each form's best round median
        for label, fn in forms:
            for _ in range(3):
                mx.eval(fn())
            ts = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                mx.eval(fn())
                ts.append(time.perf_counter() - t)
            ts.sort()
            best[label] = max(best.get(label, 0.0), nbytes / ts[len(ts) // 2])
    label = max(best, key=best.get)
    return dict(bandwidth=best[label], form=label, all=best, bytes=nbytes, rows=rows, cols=K)
