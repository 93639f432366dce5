"""The train step: learning, accumulation, gradients through references, sharding, the NaN guard."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3jax import config as config_lib
from m3jax import sharding
from m3jax.model.lm import Memory3
from m3jax.train.optimizer import make_optimizer, wsd_schedule
from m3jax.train.step import loss_terms, make_train_step

B, T, C, L = 8, 64, 4, 32


def setup(stage=2, **overrides):
    cfg = config_lib.load("tiny", {"train.stage": stage, "data.seq_len": T, "train.lr": 3e-3,
                                   "train.warmup_steps": 1, "train.batch_size": B, **overrides})
    graphdef, params = nnx.split(Memory3(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    batch = {"tokens": rng.integers(0, 2048, (B, T)).astype(np.int32),
             "ref_tokens": rng.integers(4, 2048, (B, C, L)).astype(np.int32),
             "ref_lengths": rng.integers(0, L + 1, (B, C)).astype(np.int32)}
    return cfg, graphdef, params, batch


def run(cfg, graphdef, params, batch, mesh_shape=(1, 1, 1), steps=1):
    tx, schedule = make_optimizer(cfg.train, params)
    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    step, state_sh, _ = make_train_step(cfg, graphdef, params, tx, schedule, mesh)
    params = jax.tree.map(jnp.array, params)  # a copy: the step donates its state
    state = jax.device_put({"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)},
                           state_sh)
    history = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def grads(cfg, graphdef, params, batch):
    fn = jax.grad(lambda p: loss_terms(p, graphdef, batch, cfg.train.stage, cfg.memory.grad_through_references,
                                       cfg.memory.train_window)[0])
    return jax.jit(fn)(params)


@pytest.mark.parametrize("stage", [1, 2])
def test_loss_decreases(stage):
    cfg, graphdef, params, batch = setup(stage)
    _, history = run(cfg, graphdef, params, batch, steps=25)
    assert all(h["ok"] for h in history)
    assert history[-1]["loss"] < history[1]["loss"] - 0.5


def test_accumulation_equals_one_big_batch():
    cfg1, graphdef, params, batch = setup(2)
    cfg2, *_ = setup(2, **{"train.accum_steps": 4})
    one, h1 = run(cfg1, graphdef, params, batch, steps=2)
    four, h4 = run(cfg2, graphdef, params, batch, steps=2)
    for a, b in zip(h4, h1):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    # Adam turns gradients that are zero up to rounding (g ~ 1e-10 vs 0) into visible updates
    # (g / (|g| + eps)); a tolerance of 2% of one step's update (lr 3e-3) absorbs that, nothing more.
    for a, b in zip(jax.tree.leaves(four["params"]), jax.tree.leaves(one["params"])):
        np.testing.assert_allclose(a, b, rtol=0, atol=6e-5)


def test_gradients_through_references_only_change_the_encoder_part():
    cfg_on, graphdef, params, batch = setup(2)
    cfg_off = config_lib.load("tiny", {"train.stage": 2, "data.seq_len": T, "memory.grad_through_references": False})
    on, off = grads(cfg_on, graphdef, params, batch), grads(cfg_off, graphdef, params, batch)

    def rel(part_on, part_off):
        a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(part_on)])
        b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(part_off)])
        return np.linalg.norm(a - b) / np.linalg.norm(a)

    # the reference encoder is the embedding and the memory layers (0..1 of 4): their gradients gain the
    # path through the encoding; the layers above, the final norm and the head see only rounding noise
    assert rel(on["layers"][0], off["layers"][0]) > 1e-2
    assert rel(on["embed_tokens"], off["embed_tokens"]) > 1e-2
    for name in ("layers", "norm", "lm_head"):
        part = (lambda t: t[1]) if name == "layers" else (lambda t: t)
        assert rel(part(on[name]), part(off[name])) < 1e-5, name


def test_split_attention_and_kernel_scoring_give_the_exact_gradients():
    """xla_split reads memory in two parts merged by log-sum-exp and scores written tokens through the
    attention kernel's backward (sparsify.kernel_token_scores); gradients through references equal the
    exact path's."""
    cfg, graphdef, params, batch = setup(2)
    cfg_split, graphdef_split, params_split, _ = setup(2, **{"model.attention": "xla_split"})
    want, got = grads(cfg, graphdef, params, batch), grads(cfg_split, graphdef_split, params_split, batch)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # f32 summation order: ~1e-6 of the norm
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), (a.shape, np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(mesh_shape):
    cfg, graphdef, params, batch = setup(2)
    single, h1 = run(cfg, graphdef, params, batch, steps=2)
    sharded, h8 = run(cfg, graphdef, params, batch, mesh_shape=mesh_shape, steps=2)
    np.testing.assert_allclose(h8[1]["loss"], h1[1]["loss"], rtol=1e-5)
    np.testing.assert_allclose(h8[1]["grad_norm"], h1[1]["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded["params"]), jax.tree.leaves(single["params"])):
        np.testing.assert_allclose(a, b, rtol=0, atol=6e-5)  # see the accumulation test


def test_non_finite_loss_keeps_the_last_good_state():
    cfg, graphdef, params, batch = setup(1)
    broken = jax.tree.map(lambda x: x, params)
    broken["norm"]["weight"][...] = jnp.full_like(params["norm"]["weight"][...], jnp.nan)
    state, history = run(cfg, graphdef, broken, batch, steps=1)
    assert not history[0]["ok"] and not np.isfinite(history[0]["loss"])
    assert int(state["step"]) == 0
    np.testing.assert_array_equal(state["params"]["lm_head"]["kernel"][...], params["lm_head"]["kernel"][...])


def test_wsd_schedule_shape():
    s = wsd_schedule(1.0, total_steps=100, warmup_steps=10, decay_fraction=0.2, min_ratio=0.1)
    assert float(s(0)) == 0.0 and abs(float(s(5)) - 0.5) < 1e-6
    assert float(s(10)) == float(s(79)) == 1.0
    assert abs(float(s(90)) - 0.55) < 1e-6 and abs(float(s(100)) - 0.1) < 1e-6
