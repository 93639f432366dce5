"""Logical axes map onto a (data, fsdp, tensor) mesh; a sharded forward equals the single-device one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from m3jax import config as config_lib
from m3jax import sharding
from m3jax.model.lm import Memory3, MemoryInputs


def test_mesh_fill_and_errors():
    assert sharding.make_mesh((2, -1, 1)).shape == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.make_mesh((-1, -1, 1))
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        sharding.make_mesh((3, -1, 1))


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_sharded_forward_matches_single_device(shape):
    cfg = config_lib.load("tiny", {"model.hidden_size": 64})
    model = Memory3(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 512, (8, 32)))
    kv = rng.normal(size=(8, 2, 2, 2, 2, 2, 4, 16)).astype(np.float32)
    memory = MemoryInputs(jnp.asarray(kv), jnp.ones((8, 2, 2, 4), bool))
    forward = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, memory=m))
    expected = forward(state, tokens, memory)

    mesh = sharding.make_mesh(shape)
    with sharding.activate(mesh):
        specs = sharding.param_specs(state)
        sharded_state = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), state, specs)
        batch = NamedSharding(mesh, sharding.logical_to_spec(("act_batch", None)))
        got = forward(sharded_state, jax.device_put(tokens, batch), memory)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
