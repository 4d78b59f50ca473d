"""The exercise checks on the notebooks' own cells: the placeholder is reported as not yet solved,
with a hint, and the solution as solved; neither raises. These are the checks that need no server
and no real model; the notebook runs (tests/test_notebooks.py) hold the others to the same rule.
"""

from pathlib import Path

import nbformat
import pytest
import torch
from fastapi import FastAPI

from tutorial_api import exercises, load_model

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks" / "en"
OFFLINE_CHECKS = (
    "check_square_route",
    "check_greeting",
    "check_system_field",
    "check_defaults",
    "check_left_padding",
    "check_drop_finished",
    "check_token_count",
)


def _cells(name):
    """(edit cell, check cell) of every exercise in a notebook."""
    cells = nbformat.read(NOTEBOOK_DIR / name, as_version=4).cells
    return {
        cells[index + 2].source: cells[index + 1].source
        for index, cell in enumerate(cells)
        if cell.cell_type == "markdown" and cell.source.startswith("## Exercise")
    }


SOLUTIONS = _cells("solutions.ipynb")
PLACEHOLDERS = {
    check: edit
    for name in sorted(path.name for path in NOTEBOOK_DIR.glob("0*.ipynb"))
    for check, edit in _cells(name).items()
}
CASES = [
    check for check in PLACEHOLDERS if any(f"exercises.{name}(" in check for name in OFFLINE_CHECKS)
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("tiny-qwen2")[1]  # the offline SmolLM2 tokenizer


def _verdict(edit, check, tokenizer, capsys) -> str:
    namespace = {"FastAPI": FastAPI, "torch": torch, "tokenizer": tokenizer, "exercises": exercises}
    exec(edit, namespace)
    exec(check, namespace)  # a check that raised would fail the test here
    return capsys.readouterr().out


def test_every_offline_check_is_covered():
    assert len(CASES) == len(OFFLINE_CHECKS)


@pytest.mark.parametrize(
    "check", CASES, ids=lambda check: check.split("exercises.")[-1].split("(")[0]
)
def test_the_placeholder_is_not_yet_solved_and_gets_a_hint(check, tokenizer, capsys):
    printed = _verdict(PLACEHOLDERS[check], check, tokenizer, capsys)
    assert printed.startswith(exercises.NOT_YET) and "\nHint: " in printed, printed


@pytest.mark.parametrize(
    "check", CASES, ids=lambda check: check.split("exercises.")[-1].split("(")[0]
)
def test_the_solution_is_solved(check, tokenizer, capsys):
    printed = _verdict(SOLUTIONS[check], check, tokenizer, capsys)
    assert printed.startswith(exercises.SOLVED), printed


def test_code_that_raises_is_reported_not_raised(capsys):
    def broken(client):
        raise ZeroDivisionError("division by zero")

    exercises.check_streamed_tokens(broken, client=None)
    printed = capsys.readouterr().out
    assert (
        printed.startswith(exercises.NOT_YET)
        and "ZeroDivisionError" in printed
        and "Hint: " in printed
    )


def test_a_right_answer_by_another_route_is_accepted(capsys):
    """the check tests behaviour, not the solution's text."""
    app = FastAPI()

    @app.get("/squares/{number}")
    async def square(number: int):
        return {"square": number**2, "number": number}

    exercises.check_square_route(app)
    assert capsys.readouterr().out.startswith(exercises.SOLVED)

    loose = FastAPI()

    @loose.get("/squares/{number}")
    def square_of_text(number):
        return {"number": number, "square": 144}

    exercises.check_square_route(loose)
    printed = capsys.readouterr().out
    assert printed.startswith(exercises.NOT_YET) and "number: int" in printed
