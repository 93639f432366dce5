"""Greedy decoding's two-pass argmax against NumPy's one-pass argmax."""
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.generate.sampling import greedy_token


@pytest.mark.parametrize("width,vocab,chunk", [(512, 500, 128), (300, 299, 64), (60416, 60299, 128), (100, 100, 32), (64, 60, 128), (300, 299, 0)])
def test_two_passes_pick_what_one_pass_picks(width, vocab, chunk):
    rng = np.random.default_rng(width)
    logits = rng.normal(size=(6, width)).astype(np.float32)
    logits[0, vocab:] = 100.0  # padding rows must never win
    step = min(chunk or 32, width // 3)
    logits[1, [3, step + 5, width // 2]] = 9.0  # ties across chunks: the first wins
    logits[2, [step + 7, step + 2]] = 9.0  # ties within a chunk
    logits[3, 10:20] = np.nan  # a NaN wins, the first one, as jnp.argmax has it
    logits[4] = -np.inf  # all -inf: index 0
    got = np.asarray(greedy_token(jnp.asarray(logits), vocab, chunk))
    want = np.asarray(jnp.argmax(jnp.asarray(logits[:, :vocab]), axis=-1))
    np.testing.assert_array_equal(got, want)
    assert want[1] == 3 and want[2] == step + 2 and want[3] == 10 and want[4] == 0 and want[0] < vocab
