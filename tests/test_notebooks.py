"""the notebooks: each runs top to bottom twice in one kernel, offline; they are saved clean; the README lists them."""

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import NATIVE_KERNEL_NAME, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Generous: a cell waits for at most one sampled answer, which can ramble for a minute or two on a slow CPU.
CELL_TIMEOUT = 600
# Paths of a developer's machine have no place in a notebook that learners download.
MACHINE_PATHS = ("/tmp/", "/home/", "/root/", "/Users/", "C:\\")


def _kernel_manager() -> KernelManager:
    """the "python3" kernel of the Python running the tests (its venv's kernelspec, or ipykernel's built-in one).

    Looking only in this environment keeps a user-wide "python3" kernelspec, which may point at another
    Python without this package, out of the test.
    """
    spec_manager = KernelSpecManager(kernel_dirs=[str(Path(sys.prefix) / "share" / "jupyter" / "kernels")])
    return KernelManager(kernel_name=NATIVE_KERNEL_NAME, kernel_spec_manager=spec_manager)


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.real_model
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs_twice_in_one_kernel(path, monkeypatch):
    """Run All, then Run All again in the same kernel: re-running cells must never fail (e.g. on a busy port).

    LLM answers are never compared: only that every cell runs without an error.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the kernel inherits the environment: no hub, ever
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        km=_kernel_manager(),
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # the kernel's working directory
    )
    client.reset_execution_trackers()
    seconds = []
    with client.setup_kernel(cleanup_kc=True):  # shut the kernel down afterwards, although we made its manager
        for run in ("first", "second"):
            started = time.perf_counter()
            for index, cell in enumerate(notebook.cells):
                try:
                    client.execute_cell(cell, index)
                except CellExecutionError as error:
                    pytest.fail(f"{path.name}, {run} Run All, cell {index}:\n{error}", pytrace=False)
            seconds.append(time.perf_counter() - started)
    print(f"{path.name}: first Run All {seconds[0]:.1f} s, second {seconds[1]:.1f} s")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_saved_clean(path):
    """no outputs or execution counts (they belong to the reader's run), the standard kernel, no machine paths."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [
        index for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts; clear them before saving"
    assert notebook.metadata.kernelspec.name == "python3"
    assert notebook.metadata.kernelspec.display_name == "Python 3"
    text = json.dumps([cell.source for cell in notebook.cells])
    assert not [p for p in MACHINE_PATHS if p in text], f"{path.name} mentions a path of a particular machine"


def test_readme_lists_every_notebook():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [path.name for path in NOTEBOOKS if path.name not in readme]
    assert not missing, f"README.md does not list {missing}"
