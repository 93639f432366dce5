"""A fingerprint of model weights: memories are valid only for the weights that wrote them (Remark 9).

Per parameter, two wrap-around sums of its raw bits (plain and position-weighted) in uint32. Integer
arithmetic is exact and order-free, so the fingerprint is the same on CPU, GPU and TPU and for any
sharding, costs one pass over the weights on device, and changes with any update of any weight.
"""
from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@jax.jit
def _bit_sums(x):
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
    bits = bits.reshape(-1).astype(jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


def weights_fingerprint(model) -> str:
    digest = hashlib.sha256()
    for path, var in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: str(kv[0])):
        x = var[...]
        digest.update(f"{'/'.join(map(str, path))}:{x.shape}:{x.dtype};".encode())
        digest.update(np.asarray(_bit_sums(x)).tobytes())
    return "sha256:" + digest.hexdigest()
