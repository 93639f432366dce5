"""Every notebook in notebooks/ runs top to bottom (executed, not parsed), in a fresh kernel on the CPU.

The kernel is this interpreter (a kernel spec written for the test, found first through JUPYTER_PATH),
so it sees the same packages as the tests whatever kernels the user has installed. It works in a
temporary folder. Notebooks are stored without outputs.
"""
import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "m3jax-test-python"
CELL_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory):
    """A JUPYTER_PATH holding one kernel spec: this interpreter, on the CPU."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    env = {"JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": ""}  # not the tests' 8 fake devices: one CPU device, as a user's kernel has
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "m3jax tests", "language": "python", "env": env}))
    return root


def test_notebooks_are_listed_and_stored_without_outputs():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["export_to_pytorch.ipynb", "memory_explorer.ipynb", "quickstart.ipynb"]
    index = (NOTEBOOKS / "README.md").read_text()
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert name in index
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name} holds outputs"
        assert "google.colab" in code[0].source, f"{name} must open with the Colab install cell"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "memory_explorer.ipynb", "export_to_pytorch.ipynb"])
def test_notebook_runs(name, tmp_path, kernel_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join([str(kernel_path), os.environ.get("JUPYTER_PATH", "")]))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S, startup_timeout=120,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell on the first error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
