"""The paper's central claims at small scale, in one run (SPEC 7): four arms on the same data and budget.

- two-stage: stage 1 (warmup, no memory) for `steps1`, then stage 2 (memory) for `steps2`;
- control: the same stage-1 weights continued for `steps2` on stage 2's data and schedule, no memory;
- ablation: memory from the start (stage 2 from random weights) for `steps1 + steps2`;
- and the stage-1 weights themselves, whose memory bank is written as in the paper's pipeline.
Each arm is evaluated with and without memory: held-out loss (stage 2's layout: one reference per
chunk, chunk c reads chunks c-4..c, encoded by the arm's own weights), multiple-choice benchmarks
(5 references per chunk from BM25, evaluation leakage filter 2/3), and the loss of knowledge-base text
(Wikipedia summaries given their first sentence, memories retrieved with that sentence).
Fixed seeds; every figure as measured. Memories of arms other than stage 1 are encoded on demand with
their weights (`EncodedReferences`): what a bank they wrote would hold, without writing one per arm.
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from m3jax.checkpoint import load_model
from m3jax.data.prepare import open_prepared
from m3jax.data.references import sentences
from m3jax.data.tokenizer import Tokenizer
from m3jax.demo import heldout_batches, loss_encoding_references
from m3jax.eval.heldout import sequence_loss
from m3jax.eval.run import evaluate
from m3jax.generate.memory_source import MemorySource
from m3jax.memory.build import build_bank
from m3jax.memory.cache import CachedBankReader
from m3jax.memory.encoded import EncodedReferences
from m3jax.model.lm import MemoryInputs
from m3jax.retrieval.bm25 import BM25Retriever
from m3jax.train.loop import train
from m3jax.train.loss import lm_loss

ARMS = ("stage1", "two_stage", "control", "ablation")


def arm_configs(cfg, steps1: int, steps2: int, lr1: float, lr2: float) -> dict:
    """The training config of each run, all from `cfg` (same model, data, batch, seed)."""
    def variant(**train):
        c = cfg.copy_and_resolve_references()
        for key, value in train.items():
            c.train[key] = value
        return c
    # Stage 2 and the control read on from where stage 1 stopped in the data order, so every arm sees
    # the same sequences at the same total step (here the continual set is the training set itself).
    return {"stage1": variant(stage=1, steps=steps1, lr=lr1),
            "two_stage": variant(stage=2, steps=steps2, lr=lr2, data_start_step=steps1),
            "control": variant(stage=2, stage2_memory=False, steps=steps2, lr=lr2, data_start_step=steps1),
            "ablation": variant(stage=2, steps=steps1 + steps2, lr=lr1)}


def _batches(n: int, batch: int):
    return [(lo, min(lo + batch, n)) for lo in range(0, n, batch)]


def heldout(model, arrays, batch: int, limit: int) -> dict:
    """Held-out loss without memory and with memory in stage 2's layout (encoded by these weights)."""
    graphdef, state = nnx.split(model)
    sums = np.zeros((2, 2))
    for tokens, _, refs, lengths in heldout_batches(arrays, batch, limit):
        sums[0] += np.asarray(jax.device_get(sequence_loss(graphdef, state, tokens)), np.float64)
        sums[1] += np.asarray(jax.device_get(loss_encoding_references(
            graphdef, state, tokens, refs, lengths, model.cfg.memory.train_window)), np.float64)
    return {"without_memory": sums[0, 0] / sums[0, 1], "with_memory": sums[1, 0] / sums[1, 1],
            "tokens": int(sums[0, 1])}


def knowledge_text(model, source: MemorySource, tokenizer, items, batch: int) -> dict:
    """Loss on knowledge-base references after their first sentence, without and with memory retrieved
    with that first sentence (no leakage filter: supplying this text is what the memory is for)."""
    cfg = model.cfg
    width = cfg.memory.reference_len
    chunks = -(-width // cfg.memory.chunk_len)
    graphdef, state = nnx.split(model)

    @jax.jit
    def losses(state, tokens, mask, target, kv, valid):
        m = nnx.merge(graphdef, state)
        plain = lm_loss(m(tokens, padding_mask=mask), tokens, target)
        memory = MemoryInputs(jnp_repeat(kv, chunks), jnp_repeat(valid, chunks))
        return plain, lm_loss(m(tokens, memory=memory, padding_mask=mask), tokens, target)

    sums = np.zeros((2, 2))
    for lo, hi in _batches(len(items) // batch * batch, batch):
        rows = items[lo:hi]
        tokens = np.zeros((batch, width), np.int32)
        mask = np.zeros((batch, width), bool)
        target = np.zeros((batch, width), bool)
        for i, (ids, prefix) in enumerate(rows):
            tokens[i, :len(ids)], mask[i, :len(ids)], target[i, prefix:len(ids)] = ids, True, True
        ref_ids = source.retrieve([ids[:prefix] for ids, prefix in rows])  # (B, R)
        kv, valid = source.reader.gather(ref_ids)
        plain, with_mem = jax.device_get(losses(state, tokens, mask, target, kv, valid))
        sums[0] += np.asarray(plain, np.float64)
        sums[1] += np.asarray(with_mem, np.float64)
    return {"without_memory": sums[0, 0] / sums[0, 1], "with_memory": sums[1, 0] / sums[1, 1],
            "tokens": int(sums[0, 1]), "texts": len(items) // batch * batch}


def jnp_repeat(x, chunks: int):
    """(B, R, ...) -> (B, chunks, R, ...): every chunk reads the same memories."""
    return jax.numpy.repeat(x[:, None], chunks, axis=1)


def knowledge_items(texts, doc_ids, ref_tokens, ref_lengths, tokenizer, count: int, seed: int):
    """(token ids, first-sentence length) of the first reference of `count` Wikipedia summaries."""
    if doc_ids is None:
        raise ValueError("the prepared data has no reference document ids (packed by an older m3jax): repack it")
    firsts = [i for i, d in enumerate(doc_ids) if d.startswith("wiki:") and (i == 0 or doc_ids[i - 1] != d)]
    picked = np.random.default_rng(seed).permutation(firsts)[:count]
    items = []
    for i in sorted(picked.tolist()):
        ids = [int(t) for t in ref_tokens[i, :ref_lengths[i]]]
        first = sentences(texts[i])
        prefix = len(tokenizer.encode(first[0])) if first else 1
        if 1 <= prefix < len(ids) - 1:
            items.append((ids, prefix))
    return items


def replicate(cfg, data_dir, workdir, *, steps1: int, steps2: int, lr1: float, lr2: float, tasks=(),
              task_limit: int = 500, olmo_root=None, heldout_limit: int = 256, knowledge_count: int = 256,
              eval_batch: int = 16, progress: bool = True, output=None) -> dict:
    """Runs the four arms into `workdir` and evaluates them; results go to `output` (default
    workdir/replication.json), rewritten after every arm's evaluation so a cut-off run keeps what it has."""
    workdir = pathlib.Path(workdir)
    output = pathlib.Path(output) if output else workdir / "replication.json"
    data_dir = pathlib.Path(data_dir)
    meta, arrays = open_prepared(data_dir)
    configs = arm_configs(cfg, steps1, steps2, lr1, lr2)
    seconds, results = {}, {"steps1": steps1, "steps2": steps2, "lr1": lr1, "lr2": lr2,
                            "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
                            "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len, "arms": {}}
    init = {"stage1": None, "two_stage": workdir / "stage1", "control": workdir / "stage1", "ablation": "random"}
    for arm in ARMS:
        t0 = time.perf_counter()
        train(configs[arm], data_dir, workdir / arm, init_from=init[arm], progress=progress,
              checkpoint_every=max(configs[arm].train.steps, 1), log_every=10)
        seconds[f"train_{arm}"] = time.perf_counter() - t0
        if arm == "stage1":  # the paper's pipeline: the knowledge base written with the warmup weights
            t0 = time.perf_counter()
            build_bank(load_model(cfg, str(workdir / "stage1")), np.asarray(arrays["ref_tokens"]),
                       np.asarray(arrays["ref_lengths"]), str(workdir / "bank"), batch_size=256, progress=progress)
            seconds["bank"] = time.perf_counter() - t0

    tokenizer = Tokenizer(data_dir / "tokenizer.model")
    ref_meta = json.loads((data_dir / "ref_texts.json").read_text())
    t0 = time.perf_counter()
    bm25 = BM25Retriever.build(ref_meta["texts"])
    seconds["bm25_index"] = time.perf_counter() - t0
    items = knowledge_items(ref_meta["texts"], ref_meta["doc_ids"], arrays["ref_tokens"], arrays["ref_lengths"],
                            tokenizer, knowledge_count, cfg.train.seed)
    for arm in ARMS:
        t0 = time.perf_counter()
        model = load_model(cfg, str(workdir / arm))
        if arm == "stage1":
            from m3jax.memory.bank import MemoryBank
            from m3jax.memory.fingerprint import weights_fingerprint
            bank = MemoryBank.open(str(workdir / "bank"), fingerprint=weights_fingerprint(model), cfg=cfg)
        else:
            bank = EncodedReferences(model, arrays["ref_tokens"], arrays["ref_lengths"], batch_size=256)
        source = MemorySource(cfg, bm25, CachedBankReader(bank, capacity=1 << 16), arrays["ref_tokens"],
                              arrays["ref_lengths"], tokenizer.decode)
        out = {"heldout": heldout(model, arrays, eval_batch, heldout_limit),
               "knowledge_text": knowledge_text(model, source, tokenizer, items, eval_batch)}
        if tasks:
            out["tasks"] = evaluate(model, tokenizer.encode, tasks, limit=task_limit, batch_size=eval_batch,
                                    memory_source=source, root=olmo_root)["tasks"]
        results["arms"][arm] = out
        seconds[f"eval_{arm}"] = time.perf_counter() - t0
        print(f"{arm}: {json.dumps(out['heldout'])} knowledge {json.dumps(out['knowledge_text'])}", flush=True)
        results.update(seconds=seconds, device=jax.devices()[0].device_kind, data={
            k: meta["shapes"][k] for k in ("train_tokens", "continual_tokens", "heldout_tokens", "ref_tokens")})
        output.write_text(json.dumps(results, indent=1, default=float))
    return results
