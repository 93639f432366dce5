"""seqio tasks over the corpus, reproducing `m3jax.data.prepare` row for row.

    register_tasks(tfds_data_dir, prepared_dir / "tokenizer.model", cfg)
    seqio.get_mixture_or_task("m3_pretrain").get_dataset(None, split="train", shuffle=False)

Tasks (output features are 1-D int32; no further packing or padding by seqio):
- `m3_pretrain`: the `m3_corpus` TFDS dataset (m3jax/data/tfds_builders.py), "text" tokenized into
  "targets", each document followed by `</s>`, all documents concatenated in order and cut into
  rows of seq_len, the incomplete tail dropped: exactly `prepare.pack`, so row i of split "train" /
  "heldout" is `train_tokens[i]` / `heldout_tokens[i]` of the prepared arrays.
- `m3_continual`: stage-2 sequences with "ref_ids" (seq_len / chunk_len int32, -1 = no reference).
  Retrieval for every chunk (BM25 plus the leakage filter) is the heavy offline step, so it is not
  redone here: `prepare` computes it once and this task zips it back onto the `m3_pretrain` rows, by
  position, checking every row against the prepared tokens and failing with a clear error on the
  first disagreement. Split "train" gives the prepared stage-2 subset (`continual_tokens`,
  `continual_ref_ids`), split "heldout" every held-out row (`heldout_ref_ids`).
- `m3_c4_pretrain` (tfds `c4/en`) and `m3_wikipedia_pretrain` (tfds `wikipedia/20230601.en`): the same
  packing, for users who have those datasets prepared in their TFDS data dir.

Row equality with `prepare` holds for an unsharded read with `shuffle=False`: file shuffling or
source sharding change the document order and so the packed rows. Multi-host readers should shard
the rows (`dataset.shard`) or, better, train from the prepared arrays with `StepLoader`.
"""
from __future__ import annotations

import functools
import hashlib
import pathlib

import numpy as np
import seqio
import tensorflow as tf

from m3jax.data import tfds_builders
from m3jax.data.prepare import open_prepared

PRETRAIN, CONTINUAL = "m3_pretrain", "m3_continual"
C4_PRETRAIN, WIKIPEDIA_PRETRAIN = "m3_c4_pretrain", "m3_wikipedia_pretrain"
C4 = "c4/en:3.1.0"
WIKIPEDIA = "wikipedia/20230601.en:1.0.0"
CORPUS_SPLITS = ("train", "heldout")
# Per split of m3_continual: (all packed rows, the rows that have retrieval, their reference ids).
_CONTINUAL_ARRAYS = {"train": ("train_tokens", "continual_tokens", "continual_ref_ids"),
                     "heldout": ("heldout_tokens", "heldout_tokens", "heldout_ref_ids")}


def pack_documents(dataset: tf.data.Dataset, output_features, seq_len: int) -> tf.data.Dataset:
    """Tokenized documents -> rows of seq_len: each document followed by EOS, concatenated in order,
    the incomplete tail dropped (`prepare.pack`).

    A scan carries the leftover (< seq_len tokens) from one document to the next, so the work is
    per document and per row rather than per token.
    """
    eos = output_features["targets"].vocabulary.eos_id

    def step(leftover, example):
        stream = tf.concat([leftover, tf.cast(example["targets"], tf.int32), [eos]], axis=0)
        full = tf.size(stream) // seq_len * seq_len
        return stream[full:], tf.reshape(stream[:full], [-1, seq_len])

    rows = dataset.scan(tf.zeros([0], tf.int32), step).unbatch()
    return rows.map(lambda row: {"targets": tf.ensure_shape(row, [seq_len])})


def _pretrain_task(name, source, vocab, seq_len) -> seqio.Task:
    return seqio.Task(
        name, source=source,
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            functools.partial(pack_documents, seq_len=seq_len),
        ],
        # add_eos=False: EOS ends documents, not rows; rows are already seq_len long.
        output_features={"targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)})


def _continual_rows(split, shuffle_files, seed=None, *, pretrain, prepared_dir, vocab_path, seq_len, chunks):
    """FunctionDataSource body: the pretrain rows of `split` with the prepared reference ids.

    Rows are matched to the prepared arrays by position, so the pretrain rows are always read in
    order (`shuffle_files` and `seed` are ignored; the Task may still shuffle the output rows).
    """
    del shuffle_files, seed
    meta, arrays = open_prepared(prepared_dir)
    vocab_sha = "sha256:" + hashlib.sha256(pathlib.Path(vocab_path).read_bytes()).hexdigest()
    if meta["tokenizer"] != vocab_sha:
        raise ValueError(f"{prepared_dir} was prepared with another tokenizer than {vocab_path}")
    if (meta["seq_len"], meta["seq_len"] // meta["chunk_len"]) != (seq_len, chunks):
        raise ValueError(f"{prepared_dir} has seq_len {meta['seq_len']} and chunk_len {meta['chunk_len']}; "
                         f"the config asks for seq_len {seq_len} with {chunks} chunks")
    everything, tokens, ref_ids = (arrays[name] for name in _CONTINUAL_ARRAYS[split])
    packed = pretrain.get_dataset(None, split=split, shuffle=False)

    def rows():
        # `tokens` is `everything` at increasing positions (all of them for held-out): walk both in
        # order. Retrieval depends on a row's tokens alone, so if equal rows repeat, taking the first
        # match gives the same reference ids.
        i, j = 0, 0
        for i, example in enumerate(packed.as_numpy_iterator(), start=1):
            row = example["targets"]
            if i > len(everything) or not np.array_equal(row, everything[i - 1]):
                raise ValueError(
                    f"m3_continual/{split}: packed row {i - 1} of the TFDS corpus differs from row {i - 1} of "
                    f"{prepared_dir}/{_CONTINUAL_ARRAYS[split][0]}.npy; the TFDS data and the prepared arrays "
                    "must come from the same documents, held-out fraction, tokenizer and seq_len")
            if j < len(tokens) and np.array_equal(row, tokens[j]):
                yield {"targets": row, "ref_ids": np.asarray(ref_ids[j], np.int32)}
                j += 1
        if i != len(everything) or j != len(tokens):
            raise ValueError(f"m3_continual/{split}: the TFDS corpus packs into {i} rows ({j} with retrieval); "
                             f"{prepared_dir} holds {len(everything)} ({len(tokens)} with retrieval)")

    return tf.data.Dataset.from_generator(rows, output_signature={
        "targets": tf.TensorSpec([seq_len], tf.int32), "ref_ids": tf.TensorSpec([chunks], tf.int32)})


def register_tasks(data_dir, vocab_path, cfg, *, prepared_dir=None, public_data_dir=None) -> dict[str, seqio.Task]:
    """Register (or replace) the four tasks; returns them by name.

    data_dir: the TFDS data dir holding `m3_corpus` (built with cfg.data.heldout_fraction).
    vocab_path: the SentencePiece model, normally `<prepared_dir>/tokenizer.model`.
    prepared_dir: `prepare`'s output, read by m3_continual when its dataset is built (not here);
        defaults to the folder holding vocab_path.
    public_data_dir: the TFDS data dir holding c4 and wikipedia (None: TFDS's default).
    """
    vocab_path = pathlib.Path(vocab_path)
    prepared_dir = pathlib.Path(prepared_dir) if prepared_dir is not None else vocab_path.parent
    vocab = seqio.SentencePieceVocabulary(str(vocab_path))
    seq_len, chunks = cfg.data.seq_len, cfg.data.seq_len // cfg.memory.chunk_len
    corpus_name = f"m3_corpus/{tfds_builders.fraction_config_name(cfg.data.heldout_fraction)}:1.0.0"
    pretrain = _pretrain_task(
        PRETRAIN, seqio.TfdsDataSource(corpus_name, tfds_data_dir=str(data_dir), splits=CORPUS_SPLITS), vocab, seq_len)
    continual = seqio.Task(
        CONTINUAL,
        source=seqio.FunctionDataSource(
            functools.partial(_continual_rows, pretrain=pretrain, prepared_dir=prepared_dir, vocab_path=vocab_path,
                              seq_len=seq_len, chunks=chunks),
            splits=CORPUS_SPLITS),
        preprocessors=[],
        output_features={"targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
                         # reference ids are not tokens: -1 marks a chunk without a reference
                         "ref_ids": seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False,
                                                  dtype=tf.int32)})
    public_dir = None if public_data_dir is None else str(public_data_dir)
    tasks = [
        pretrain, continual,
        _pretrain_task(C4_PRETRAIN, seqio.TfdsDataSource(C4, tfds_data_dir=public_dir, splits=("train", "validation")),
                       vocab, seq_len),
        _pretrain_task(WIKIPEDIA_PRETRAIN, seqio.TfdsDataSource(WIKIPEDIA, tfds_data_dir=public_dir, splits=("train",)),
                       vocab, seq_len),
    ]
    for task in tasks:
        seqio.TaskRegistry.remove(task.name)  # re-registering replaces, e.g. with another data dir
        seqio.TaskRegistry.add_provider(task.name, task)
    return {task.name: task for task in tasks}
