"""the notebooks, in English and in Chinese with the same code: each runs top to bottom twice in one kernel, offline;
they are saved clean; both READMEs list them."""

import json
import re
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
# The sequence in two languages: the same code cells, prose in English and in Chinese.
LANGUAGES = ("en", "zh")
NAMES = sorted(path.name for path in (NOTEBOOK_DIR / "en").glob("*.ipynb"))
NOTEBOOKS = [NOTEBOOK_DIR / language / name for language in LANGUAGES for name in NAMES]
READMES = {"en": ROOT / "README.md", "zh": ROOT / "README.zh-CN.md"}
# Generous: a cell waits for at most one sampled answer, which can ramble for a minute or two on a slow CPU.
CELL_TIMEOUT = 600
# Paths of a developer's machine have no place in a notebook that learners download.
MACHINE_PATHS = ("/tmp/", "/home/", "/root/", "/Users/", "C:\\")
CHINESE = re.compile(r"[\u4e00-\u9fff]")


def _kernel_manager() -> KernelManager:
    """the "python3" kernel of the Python running the tests (its venv's kernelspec, or ipykernel's built-in one).

    Looking only in this environment keeps a user-wide "python3" kernelspec, which may point at another
    Python without this package, out of the test.
    """
    spec_manager = KernelSpecManager(kernel_dirs=[str(Path(sys.prefix) / "share" / "jupyter" / "kernels")])
    return KernelManager(kernel_name=NATIVE_KERNEL_NAME, kernel_spec_manager=spec_manager)


def test_there_are_notebooks_in_both_languages():
    assert NAMES, f"no notebooks in {NOTEBOOK_DIR / 'en'}"
    assert sorted(path.name for path in (NOTEBOOK_DIR / "zh").glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_the_two_languages_share_every_code_cell(name):
    """cell for cell: the same kinds in the same order, identical code; only the prose is translated."""
    english, chinese = (nbformat.read(NOTEBOOK_DIR / language / name, as_version=4) for language in LANGUAGES)
    assert [cell.cell_type for cell in english.cells] == [cell.cell_type for cell in chinese.cells]
    for index, (en, zh) in enumerate(zip(english.cells, chinese.cells)):
        if en.cell_type == "code":
            assert en.source == zh.source, f"{name}, cell {index}: the code differs between the two languages"
        else:
            assert CHINESE.search(zh.source), f"zh/{name}, cell {index} has no Chinese"
            assert en.source != zh.source, f"zh/{name}, cell {index} is not translated"


@pytest.mark.real_model
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_twice_in_one_kernel(name, monkeypatch):
    """Run All, then Run All again in the same kernel: re-running cells must never fail (e.g. on a busy port).

    Both languages run this code (the pairing test holds them to it), so it runs once. LLM answers are never
    compared: only that every cell runs without an error.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the kernel inherits the environment: no hub, ever
    notebook = nbformat.read(NOTEBOOK_DIR / "en" / name, as_version=4)
    client = NotebookClient(
        notebook,
        km=_kernel_manager(),
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(NOTEBOOK_DIR / "en")}},  # the kernel's working directory
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
                    pytest.fail(f"{name}, {run} Run All, cell {index}:\n{error}", pytrace=False)
            seconds.append(time.perf_counter() - started)
    print(f"{name}: first Run All {seconds[0]:.1f} s, second {seconds[1]:.1f} s")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: f"{path.parent.name}/{path.name}")
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


@pytest.mark.parametrize("language", LANGUAGES)
def test_each_readme_lists_every_notebook_of_both_languages(language):
    readme = READMES[language].read_text(encoding="utf-8")
    missing = [f"notebooks/{folder}/" for folder in LANGUAGES if f"notebooks/{folder}/" not in readme]
    missing += [name for name in NAMES if name not in readme]
    assert not missing, f"{READMES[language].name} does not list {missing}"
