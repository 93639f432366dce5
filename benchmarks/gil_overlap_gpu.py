"""Does host Python run while another thread waits on the accelerator? (why generate_many uses threads)

    python benchmarks/gil_overlap_gpu.py

A jitted loop (a `lax.fori_loop`, a while loop on the device like a decoding span) runs in one thread,
called in several ways; the main thread counts Python loop iterations meanwhile. Python iterations
per second while waiting, against alone, show whether the waiting thread holds the GIL.
"""
from __future__ import annotations

import json
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def device_loop(x):
    return jax.lax.fori_loop(0, 2000, lambda i, x: jnp.tanh(x @ x), x)


@jax.jit
def straight(x):
    for _ in range(20):
        x = jnp.tanh(x @ x)
    return x


def count_python(seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += 1
    return n / seconds


def main() -> None:
    x = jnp.ones((2048, 2048), jnp.float32) * 1e-3
    np.asarray(device_loop(x)), np.asarray(straight(x))  # compile
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "alone_iters_per_s": count_python(0.5)}
    ways = {"fori_loop, np.asarray": lambda: np.asarray(device_loop(x)),
            "fori_loop, block_until_ready": lambda: device_loop(x).block_until_ready(),
            "fori_loop, dispatch only": lambda: device_loop(x),
            "straight x100, np.asarray": lambda: [np.asarray(straight(x)) for _ in range(100)]}
    for name, call in ways.items():
        box = {}

        def worker(call=call, box=box):
            start = time.perf_counter()
            call()
            box["call_s"] = time.perf_counter() - start

        thread = threading.Thread(target=worker)
        thread.start()
        box["python_iters_per_s"] = count_python(0.3)
        thread.join()
        box["python_share"] = box["python_iters_per_s"] / result["alone_iters_per_s"]
        result[name] = box
        print(name, json.dumps(box), flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
