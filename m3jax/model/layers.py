"""Building blocks of the decoder: parameters with logical axes, linear maps, RMSNorm, RoPE, SwiGLU.

Parameter names and layouts follow HF Llama (`q_proj`, `gate_proj`, `input_layernorm`, rotate-half
RoPE), so exporting the backbone is a pure mapping: transpose, reshape, unstack layers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m3jax.model.decode_matmul import decode_matmul, partial_products
from m3jax.sharding import constrain


def param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
    """A parameter annotated with logical axis names (mapped to a mesh by sharding rules)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match parameter shape {shape}")
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(axes), eager_sharding=False)


class Linear(nnx.Module):
    """A bias-free linear map written as an einsum, so kernels can keep head axes (e.g. (embed, heads, dim))."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, *, std, dtype, param_dtype, rngs):
        self.in_ndim = len(in_shape)
        self.kernel = param(rngs, nnx.initializers.normal(std), (*in_shape, *out_shape),
                            (*in_axes, *out_axes), param_dtype)
        self.dtype = dtype

    def __call__(self, x):
        letters = "abcdefgh"
        n_in, n_out = self.in_ndim, self.kernel.ndim - self.in_ndim
        ins, outs = letters[:n_in], letters[n_in:n_in + n_out]
        spec = f"...{ins},{ins}{outs}->...{outs}"
        return jnp.einsum(spec, x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim, *, eps, dtype, param_dtype, rngs):
        self.weight = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)  # the statistic in f32 whatever the compute dtype
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(self.dtype)


class MLP(nnx.Module):
    """SiLU-gated MLP without bias (SwiGLU), as in Llama."""

    def __init__(self, dim, hidden, *, std, dtype, param_dtype, rngs, decode_matmul="xla"):
        kw = dict(std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.decode_matmul = decode_matmul  # how `fused` multiplies (m3jax/model/decode_matmul.py)
        self.gate_proj = Linear((dim,), (hidden,), ("embed",), ("mlp",), **kw)
        self.up_proj = Linear((dim,), (hidden,), ("embed",), ("mlp",), **kw)
        self.down_proj = Linear((hidden,), (dim,), ("mlp",), ("embed",), **kw)

    def __call__(self, x, gate_up_kernel=None):
        """gate_up_kernel: None, or gate and up kernels stacked, (dim, 2, hidden): one product instead of two."""
        with jax.named_scope("mlp"):
            if gate_up_kernel is None:
                h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
            else:
                dtype = self.gate_proj.dtype
                gate_up = jnp.einsum("...d,dgh->...gh", x.astype(dtype), gate_up_kernel.astype(dtype))
                h = jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
            h = constrain(h, ("batch", "length", "mlp"))
            return self.down_proj(h)

    def fused(self, x, gate_up_kernel, partials=False):
        """The same with gate and up kernels stacked, (dim, 2, hidden): one GEMM (decoding). partials: return
        the down product as f32 partial sums, `partial_products` (splits, rows >= x's rows, dim)."""
        with jax.named_scope("mlp"):
            dtype = self.down_proj.dtype
            gate_up = decode_matmul(x.astype(dtype), gate_up_kernel, self.decode_matmul,
                                    next_weight=self.down_proj.kernel[...])
            h = jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
            if partials:
                return partial_products(h.reshape(-1, h.shape[-1]), self.down_proj.kernel[...], self.decode_matmul)
            return decode_matmul(h, self.down_proj.kernel[...], self.decode_matmul)


def rope_angles(positions, head_dim: int, theta: float):
    """cos, sin of shape positions.shape + (head_dim,), in f32, HF's rotate-half layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x: (..., T, H, D); cos/sin: (..., T, D). Rotation in f32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[..., None, :] + rotated * sin[..., None, :]
    return out.astype(x.dtype)
