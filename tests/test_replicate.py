"""The replication driver on synthetic data: arms, budgets, data alignment, and memories encoded on demand."""
import json

import numpy as np
import pytest
from flax import nnx

from m3jax import config as config_lib
from m3jax.data.prepare import open_prepared, prepare
from m3jax.memory.cache import CachedBankReader
from m3jax.memory.encoded import EncodedReferences
from m3jax.memory.write import write_memories
from m3jax.model.lm import Memory3
from m3jax.replicate import arm_configs, replicate
from synthetic_data import synthetic

TRAIN = {"train.batch_size": 8, "train.warmup_steps": 1, "train.mesh": (1, -1, 1)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(config_lib.load("tiny"), None, out, documents=synthetic(), progress=False)
    return out


def test_arms_share_model_data_and_budget():
    arms = arm_configs(config_lib.load("tiny", TRAIN), steps1=30, steps2=10, lr1=1e-3, lr2=5e-4)
    assert arms["stage1"].train.steps + arms["two_stage"].train.steps == arms["ablation"].train.steps == 40
    assert arms["control"].train.steps == arms["two_stage"].train.steps
    assert (arms["two_stage"].train.stage2_memory, arms["control"].train.stage2_memory) == (True, False)
    assert arms["two_stage"].train.data_start_step == arms["control"].train.data_start_step == 30
    assert arms["ablation"].train.data_start_step == 0
    assert len({json.dumps(a.model.to_dict(), sort_keys=True) for a in arms.values()}) == 1


def test_encoded_references_read_like_a_bank_written_by_the_same_weights():
    cfg = config_lib.load("tiny", {"model.dtype": "float32"})
    model = Memory3(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, cfg.model.vocab_size, (12, cfg.memory.reference_len))
    lengths = rng.integers(3, cfg.memory.reference_len + 1, 12)
    memories, slots = write_memories(model, tokens, lengths)
    reader = CachedBankReader(EncodedReferences(model, tokens, lengths, batch_size=4), dtype=np.float32)
    ids = np.array([[3, -1], [11, 3]])
    got, valid = reader.gather(ids)
    np.testing.assert_allclose(got[0, 0], memories[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1, 0], memories[11], rtol=1e-5, atol=1e-6)
    assert (valid[0, 0] == slots[3]).all() and not valid[0, 1].any()
    with pytest.raises(IndexError, match="reference ids"):
        EncodedReferences(model, tokens, lengths).read(np.array([12]))


def test_replicate_runs_every_arm_and_reports_with_and_without_memory(data, tmp_path):
    cfg = config_lib.load("tiny", TRAIN)
    out = replicate(cfg, data, tmp_path / "run", steps1=6, steps2=3, lr1=3e-3, lr2=1e-3, heldout_limit=16,
                    knowledge_count=16, eval_batch=4, progress=False)
    assert set(out["arms"]) == {"stage1", "two_stage", "control", "ablation"}
    for arm in out["arms"].values():
        for part in ("heldout", "knowledge_text"):
            assert np.isfinite(arm[part]["without_memory"]) and np.isfinite(arm[part]["with_memory"])
    steps = {arm: max(int(d.name) for d in (tmp_path / "run" / arm / "checkpoints").iterdir() if d.name.isdigit())
             for arm in out["arms"]}
    assert steps == {"stage1": 6, "two_stage": 3, "control": 3, "ablation": 9}
    # The control trains without memory: its weights differ from stage 2's, which did read memories.
    two, control = out["arms"]["two_stage"]["heldout"], out["arms"]["control"]["heldout"]
    assert two["without_memory"] != control["without_memory"]
    assert json.loads((tmp_path / "run" / "replication.json").read_text())["steps1"] == 6
    _, arrays = open_prepared(data)
    rows = min(16, len(arrays["heldout_tokens"])) // 4 * 4  # whole batches of 4
    assert out["arms"]["stage1"]["heldout"]["tokens"] == rows * (arrays["heldout_tokens"].shape[1] - 1) > 0
