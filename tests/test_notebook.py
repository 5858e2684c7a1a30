"""notebooks/quickstart.ipynb: committed without outputs, and runs top to bottom in SMOKE mode.

The run executes the notebook as a user would (cwd `notebooks/`, a fresh `python3` kernel of
this interpreter) with the smoke parameters injected through the environment variables its
parameters cell reads, into temporary data and work directories.
"""

import os
import pathlib
import sys

import nbformat
import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def _code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_committed_notebook_has_no_outputs_or_execution_counts():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    stale = [
        i
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not stale, f"cells {stale} of {NOTEBOOK.name} carry outputs; clear them before commit"


def test_notebook_has_one_papermill_parameters_cell_defining_smoke():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert "SMOKE =" in tagged[0].source
    assert "M2NET_SMOKE" in tagged[0].source  # what the execution test below relies on


def test_notebook_trains_through_the_library_not_the_command_line():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = "\n".join(cell.source for cell in _code_cells(notebook))
    assert "train.train_and_evaluate(" in code
    assert "m2net_jax.main" not in code


@pytest.mark.notebook
@pytest.mark.slow
def test_notebook_runs_top_to_bottom_in_smoke_mode(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # A first cell reporting the kernel's interpreter, to check it is this one (with the
    # project's dependencies), not whichever `python3` a kernel spec happens to name.
    probe = nbformat.v4.new_code_cell("import sys\nprint(sys.executable)")
    notebook.cells.insert(0, probe)

    monkeypatch.setenv("M2NET_SMOKE", "1")
    monkeypatch.setenv("M2NET_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("M2NET_WORKDIR", str(tmp_path / "workdir"))
    # The kernel's own inline backend, so every figure is really rendered (to PNG outputs).
    monkeypatch.delenv("MPLBACKEND", raising=False)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=600,  # per cell
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    printed = "".join(out.get("text", "") for out in notebook.cells[0].outputs)
    assert os.path.realpath(printed.strip()) == os.path.realpath(sys.executable)
    errors = [
        out for cell in _code_cells(notebook) for out in cell.outputs if out.output_type == "error"
    ]
    assert not errors
    assert (tmp_path / "workdir" / "results.json").is_file()
    assert (tmp_path / "tfds" / "geo_twins" / "smoke").is_dir()
