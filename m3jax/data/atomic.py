"""Folders that appear complete or not at all: write into `<name>.partial`, then rename into place."""
from __future__ import annotations

import pathlib
import shutil


def partial_dir(path) -> pathlib.Path:
    """A fresh, empty `<path>.partial` folder to write into (a leftover from a crashed run is removed)."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp, path) -> pathlib.Path:
    """Replace `path` by the finished `tmp` folder in one rename: the commit point."""
    path = pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)
    pathlib.Path(tmp).rename(path)
    return path
