"""The SentencePiece vocabulary, trained on the pretraining corpus, and the reference start.

Fixed ids: pad 0, `<s>` 1, `</s>` 2, unk 3, and `Reference:` 4, a user-defined piece, so the reference
start `<s>Reference:` (SPEC 4) is always the two ids (1, 4) whatever text follows it. Byte fallback
keeps every string encodable. The same model file serves `seqio.SentencePieceVocabulary` and, without
TensorFlow, `sentencepiece` itself.
"""
from __future__ import annotations

import hashlib
import io
import pathlib
import random
from typing import Iterable

import sentencepiece as spm

PAD, BOS, EOS, UNK = 0, 1, 2, 3
REFERENCE_PIECE = "Reference:"
REFERENCE_PREFIX = (BOS, 4)


def train(texts: Iterable[str], path: str | pathlib.Path, vocab_size: int, max_sentences: int = 2_000_000,
          seed: int = 0) -> pathlib.Path:
    """Train on `texts` (one sentence or line per item; at most max_sentences of them, sampled with `seed`)
    and write the model to `path` atomically. The same texts and seed give the same model."""
    path = pathlib.Path(path)
    # SentencePiece's own sampling of input sentences differs from process to process whatever its seed
    # (sentencepiece 0.2), so prepared data was not reproducible: the sample is drawn here instead.
    texts = sample(texts, max_sentences, seed)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=UNK, user_defined_symbols=[REFERENCE_PIECE],
        byte_fallback=True, character_coverage=0.9995, input_sentence_size=max_sentences,
        shuffle_input_sentence=False, num_threads=2, minloglevel=2,
        max_sentence_length=8192, hard_vocab_limit=False)  # small corpora may support fewer pieces
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(path)
    return path


def sample(texts: Iterable[str], k: int, seed: int) -> list[str]:
    """k of the texts chosen uniformly at random (all of them if fewer), reproducibly for a seed: reservoir
    sampling in one pass, so the corpus is never held whole."""
    rng, kept = random.Random(seed), []
    for i, text in enumerate(texts):
        if i < k:
            kept.append(text)
        elif (j := rng.randrange(i + 1)) < k:
            kept[j] = text
    return kept


class Tokenizer:
    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {self.path} (run `m3jax data prepare`)")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        if self.sp.piece_to_id(REFERENCE_PIECE) != REFERENCE_PREFIX[1] or self.sp.bos_id() != BOS:
            raise ValueError(f"{self.path} is not an m3jax vocabulary: `{REFERENCE_PIECE}` must be id "
                             f"{REFERENCE_PREFIX[1]} and <s> id {BOS}")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        return "sha256:" + hashlib.sha256(self.path.read_bytes()).hexdigest()
