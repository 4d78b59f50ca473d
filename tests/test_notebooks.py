"""The notebooks, in English and in Chinese with the same code: each runs top to bottom twice in one
kernel, offline, its exercises' checks reporting the placeholders unsolved (the solutions notebook:
solved); two kernels run notebook 04 side by side; they are saved clean; both READMEs list them.
"""

import asyncio
import json
import re
import socket
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import NATIVE_KERNEL_NAME, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tutorial_api.exercises import NOT_YET, SOLVED

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
# The sequence in two languages: the same code cells, prose in English and in Chinese.
LANGUAGES = ("en", "zh")
NAMES = sorted(path.name for path in (NOTEBOOK_DIR / "en").glob("*.ipynb"))
NOTEBOOKS = [NOTEBOOK_DIR / language / name for language in LANGUAGES for name in NAMES]
SOLUTIONS = "solutions.ipynb"
SEQUENCE = [name for name in NAMES if name != SOLUTIONS]
EXERCISE_TITLES = {"en": "## Exercise", "zh": "## 练习"}
READMES = {"en": ROOT / "README.md", "zh": ROOT / "README.zh-CN.md"}
# Generous: a cell waits for at most one sampled answer, which can ramble for a minute or two on a
# slow CPU.
CELL_TIMEOUT = 600
# Paths of a developer's machine have no place in a notebook that learners download.
MACHINE_PATHS = ("/tmp/", "/home/", "/root/", "/Users/", "C:\\")
CHINESE = re.compile(r"[\u4e00-\u9fff]")


def _kernel_manager() -> KernelManager:
    """The "python3" kernel of the Python running the tests (its venv's kernelspec, or ipykernel's
    built-in one).

    Looking only in this environment keeps a user-wide "python3" kernelspec, which may point at
    another Python without this package, out of the test.
    """
    spec_manager = KernelSpecManager(
        kernel_dirs=[str(Path(sys.prefix) / "share" / "jupyter" / "kernels")]
    )
    return KernelManager(kernel_name=NATIVE_KERNEL_NAME, kernel_spec_manager=spec_manager)


def test_there_are_notebooks_in_both_languages():
    assert NAMES, f"no notebooks in {NOTEBOOK_DIR / 'en'}"
    assert sorted(path.name for path in (NOTEBOOK_DIR / "zh").glob("*.ipynb")) == NAMES
    assert SOLUTIONS in NAMES


def exercises_in(notebook, language) -> list[tuple[str, str]]:
    """(the cell the learner edits, the check cell) of each exercise: a titled markdown cell, then
    those two.
    """
    cells = notebook.cells
    found = []
    for index, cell in enumerate(cells):
        if cell.cell_type == "markdown" and cell.source.startswith(EXERCISE_TITLES[language]):
            edit, check = cells[index + 1], cells[index + 2]
            assert edit.cell_type == check.cell_type == "code", (
                f"exercise at cell {index}: two code cells must follow"
            )
            assert "exercises.check_" in check.source and "exercises.check_" not in edit.source
            found.append((edit.source, check.source))
    return found


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_notebook_ends_with_two_to_four_checked_exercises(language):
    counts = {}
    for name in SEQUENCE:
        notebook = nbformat.read(NOTEBOOK_DIR / language / name, as_version=4)
        counts[name] = len(exercises_in(notebook, language))
        checks = [
            index for index, cell in enumerate(notebook.cells) if "exercises.check_" in cell.source
        ]
        assert checks and len(notebook.cells) - checks[-1] <= 4, (
            f"{name}: the exercises are not at the end"
        )
    assert all(2 <= count <= 4 for count in counts.values()), counts
    assert sum(counts.values()) >= 12, counts


def test_the_solutions_answer_every_exercise_with_the_same_check():
    """each exercise of the sequence has a solution, and the same check cell after it."""
    solutions = dict(
        (check, edit)
        for edit, check in exercises_in(
            nbformat.read(NOTEBOOK_DIR / "en" / SOLUTIONS, as_version=4), "en"
        )
    )
    for name in SEQUENCE:
        for placeholder, check in exercises_in(
            nbformat.read(NOTEBOOK_DIR / "en" / name, as_version=4), "en"
        ):
            assert check in solutions, f"{name}: no solution for the exercise checked by {check!r}"
            assert solutions[check] != placeholder, (
                f"{name}: the solution is the placeholder itself"
            )


@pytest.mark.parametrize("name", NAMES)
def test_the_two_languages_share_every_code_cell(name):
    """Cell for cell: the same kinds in the same order, identical code; only the prose is
    translated.
    """
    english, chinese = (
        nbformat.read(NOTEBOOK_DIR / language / name, as_version=4) for language in LANGUAGES
    )
    assert [cell.cell_type for cell in english.cells] == [cell.cell_type for cell in chinese.cells]
    for index, (en, zh) in enumerate(zip(english.cells, chinese.cells, strict=True)):
        if en.cell_type == "code":
            assert en.source == zh.source, (
                f"{name}, cell {index}: the code differs between the two languages"
            )
        else:
            assert CHINESE.search(zh.source), f"zh/{name}, cell {index} has no Chinese"
            assert en.source != zh.source, f"zh/{name}, cell {index} is not translated"


@pytest.mark.real_model
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_twice_in_one_kernel(name, monkeypatch):
    """Run All, then Run All again in the same kernel: re-running cells must never fail (e.g. on a
    busy port).

    Both languages run this code (the pairing test holds them to it), so it runs once. LLM answers
    are never compared: only that every cell runs without an error, and that every exercise's check
    reports the unsolved placeholder as not yet solved (in the solutions notebook: as solved), each
    time, without stopping Run All.
    """
    verdict = SOLVED if name == SOLUTIONS else NOT_YET
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the kernel inherits the environment: no hub, ever
    notebook = nbformat.read(NOTEBOOK_DIR / "en" / name, as_version=4)
    client = NotebookClient(
        notebook,
        km=_kernel_manager(),
        timeout=CELL_TIMEOUT,
        resources={
            "metadata": {"path": str(NOTEBOOK_DIR / "en")}
        },  # the kernel's working directory
    )
    client.reset_execution_trackers()
    seconds = []
    with client.setup_kernel(
        cleanup_kc=True
    ):  # shut the kernel down afterwards, although we made its manager
        for run in ("first", "second"):
            started = time.perf_counter()
            for index, cell in enumerate(notebook.cells):
                try:
                    client.execute_cell(cell, index)
                except CellExecutionError as error:
                    pytest.fail(f"{name}, {run} Run All, cell {index}:\n{error}", pytrace=False)
                if "exercises.check_" in cell.source:
                    printed = "".join(output.get("text", "") for output in cell.outputs)
                    assert verdict in printed, (
                        f"{name}, {run} Run All, check cell {index} printed:\n{printed}"
                    )
            seconds.append(time.perf_counter() - started)
    print(f"{name}: first Run All {seconds[0]:.1f} s, second {seconds[1]:.1f} s")


def _printed(notebook) -> str:
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


@pytest.mark.real_model
def test_two_kernels_run_notebook_04_at_once(monkeypatch):
    """Two students on one machine, with the README's server on 6006: both finish, each on a port of
    its own.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = next(name for name in NAMES if name.startswith("04_"))
    notebooks = [nbformat.read(NOTEBOOK_DIR / "en" / name, as_version=4) for _ in range(2)]
    clients = [
        NotebookClient(
            notebook,
            km=_kernel_manager(),
            timeout=CELL_TIMEOUT,
            resources={"metadata": {"path": str(NOTEBOOK_DIR / "en")}},
        )
        for notebook in notebooks
    ]
    with socket.socket() as readme_server:
        readme_server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # stands in for `python -m tutorial_api serve`; if another program holds 6006, that one does
        try:
            readme_server.bind(("127.0.0.1", 6006))
            readme_server.listen()
        except OSError:
            pass

        async def both():
            await asyncio.gather(*(client.async_execute() for client in clients))

        asyncio.run(both())
    printed = [_printed(notebook) for notebook in notebooks]
    urls = [re.search(r"serving on (http://\S+)", text).group(1) for text in printed]
    assert urls[0] != urls[1] and not any(url.endswith(":6006") for url in urls)
    assert all("Port 6006 is taken already" in text for text in printed)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_notebook_is_saved_clean(path):
    """No outputs or execution counts (they belong to the reader's run), the standard kernel, no
    machine paths.
    """
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} carry outputs or execution counts; clear them before saving"
    )
    assert notebook.metadata.kernelspec.name == "python3"
    assert notebook.metadata.kernelspec.display_name == "Python 3"
    text = json.dumps([cell.source for cell in notebook.cells])
    assert not [p for p in MACHINE_PATHS if p in text], (
        f"{path.name} mentions a path of a particular machine"
    )


@pytest.mark.parametrize("language", LANGUAGES)
def test_each_readme_lists_every_notebook_of_both_languages(language):
    readme = READMES[language].read_text(encoding="utf-8")
    missing = [
        f"notebooks/{folder}/" for folder in LANGUAGES if f"notebooks/{folder}/" not in readme
    ]
    missing += [name for name in NAMES if name not in readme]
    assert not missing, f"{READMES[language].name} does not list {missing}"
