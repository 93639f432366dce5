"""Output folders of export / import: refuse to clobber, and appear complete or not at all."""
from __future__ import annotations

import contextlib
import pathlib
import shutil

from m3jax.data.atomic import commit_dir, partial_dir


def check_out_dir(out, overwrite: bool) -> pathlib.Path:
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out={out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out={out} exists and is not empty; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def atomic_out_dir(out, overwrite: bool = False):
    """Yield a temporary folder to write into; on success it replaces `out` in one rename, on error it is removed."""
    out = check_out_dir(out, overwrite)
    tmp = partial_dir(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, out)
