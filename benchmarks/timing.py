"""Wall time of a jitted call on an accelerator: the median of repeated calls after warming up."""
from __future__ import annotations

import time

import jax
import numpy as np


def median_seconds(fn, *args, reps: int = 20) -> float:
    """Median seconds of `fn(*args)` to a finished result, after two calls (compile, warm-up) not counted."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))
