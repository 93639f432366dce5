"""Prepared data as a few xz-compressed files, to carry to a machine that cannot rebuild it (the lent GPU:
no TensorFlow, at most 64 MiB per call), and back into a prepared-data folder there.

The packed folder holds meta.json, tokenizer.model, one `<array>.npy.xz` per array and the references'
document ids (`ref_doc_ids.json.xz`); the reference texts are left out (they are the references' tokens
decoded, and unpacking decodes them again).
"""
from __future__ import annotations

import hashlib
import json
import lzma
import pathlib
import shutil

from m3jax.data.atomic import commit_dir, partial_dir
from m3jax.data.prepare import ARRAYS, open_prepared


def pack(data_dir, out_dir, preset: int = 6) -> int:
    """Write the packed form of `data_dir` into `out_dir`; returns its size in bytes."""
    data_dir, out_dir = pathlib.Path(data_dir), pathlib.Path(out_dir)
    open_prepared(data_dir, verify=True)  # never pack data that is already damaged
    tmp = partial_dir(out_dir)
    for name in ("meta.json", "tokenizer.model"):
        shutil.copy(data_dir / name, tmp / name)
    for name in ARRAYS:
        (tmp / f"{name}.npy.xz").write_bytes(lzma.compress((data_dir / f"{name}.npy").read_bytes(), preset=preset))
    pack_doc_ids(data_dir, tmp)
    commit_dir(tmp, out_dir)
    return sum(f.stat().st_size for f in out_dir.iterdir())


def pack_doc_ids(data_dir, out_dir) -> None:
    """The document id of each reference (which source, which article), xz-compressed JSON."""
    doc_ids = json.loads((pathlib.Path(data_dir) / "ref_texts.json").read_text()).get("doc_ids")
    (pathlib.Path(out_dir) / DOC_IDS).write_bytes(lzma.compress(json.dumps(doc_ids).encode()))


DOC_IDS = "ref_doc_ids.json.xz"


def unpack(packed_dir, data_dir) -> pathlib.Path:
    """Restore a prepared-data folder from its packed form, checking every array against meta.json."""
    from m3jax.data.tokenizer import Tokenizer

    packed_dir, data_dir = pathlib.Path(packed_dir), pathlib.Path(data_dir)
    if not (packed_dir / "meta.json").is_file():
        raise FileNotFoundError(f"no packed data in {packed_dir} (meta.json missing)")
    meta = json.loads((packed_dir / "meta.json").read_text())
    tmp = partial_dir(data_dir)
    for name in ("meta.json", "tokenizer.model"):
        shutil.copy(packed_dir / name, tmp / name)
    for name in ARRAYS:
        try:
            raw = lzma.decompress((packed_dir / f"{name}.npy.xz").read_bytes())
        except (OSError, lzma.LZMAError) as e:
            raise ValueError(f"{packed_dir / (name + '.npy.xz')} cannot be decompressed: {e}") from None
        if hashlib.sha256(raw).hexdigest() != meta["sha256"][name]:
            raise ValueError(f"{packed_dir / (name + '.npy.xz')} does not match its checksum in meta.json")
        (tmp / f"{name}.npy").write_bytes(raw)
    _, arrays = open_prepared(tmp)
    tokenizer = Tokenizer(tmp / "tokenizer.model")
    texts = [tokenizer.decode(row[:n]) for row, n in zip(arrays["ref_tokens"], arrays["ref_lengths"])]
    doc_ids = json.loads(lzma.decompress((packed_dir / DOC_IDS).read_bytes())) if (packed_dir / DOC_IDS).is_file() \
        else None  # packed before document ids were kept
    (tmp / "ref_texts.json").write_text(json.dumps({"texts": texts, "doc_ids": doc_ids}))
    return commit_dir(tmp, data_dir)
