"""The teacher's runbook, in English and Chinese: each links the other, and its commands are ones
the kit accepts.
"""

import re
import shlex
import sys
from pathlib import Path

import pytest

from tutorial_api.cli import _parser

ROOT = Path(__file__).parent.parent
RUNBOOKS = {"en": ROOT / "docs" / "workshop.md", "zh": ROOT / "docs" / "workshop.zh-CN.md"}
sys.path.insert(0, str(ROOT / "benchmarks"))

import soak  # noqa: E402

# The kit's commands whose options this test checks against the real parsers; `download` comes from
# another module.
CHECKED = ("keys", "serve", "chat", "download")


def commands(text: str, program: str) -> list[list[str]]:
    """Each `program ...` command in the text, continued lines joined, without a trailing
    redirection.
    """
    text = text.replace("\\\n", " ")
    found = re.findall(re.escape(program) + r"[^`\n]*", text)
    return [shlex.split(command.split(" > ")[0])[len(program.split()) :] for command in found]


@pytest.mark.parametrize("language", RUNBOOKS)
def test_the_kit_accepts_the_runbook_commands(language):
    checked = [
        argv
        for argv in commands(RUNBOOKS[language].read_text(), "python -m tutorial_api")
        if argv[0] in CHECKED
    ]
    assert {argv[0] for argv in checked} == set(CHECKED)
    for argv in checked:
        _parser().parse_args(argv)  # exits, naming the option, if one is unknown or malformed


@pytest.mark.parametrize("language", RUNBOOKS)
def test_the_soak_script_accepts_the_runbook_commands(language, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "class-keys.txt").write_text("student01:a-key\n")
    rehearsals = commands(RUNBOOKS[language].read_text(), "python benchmarks/soak.py")
    assert any("--table" in argv for argv in rehearsals) and any(
        "--table" not in argv for argv in rehearsals
    )
    for argv in rehearsals:
        soak.parse_args(argv)


def test_each_runbook_links_the_other():
    assert "(workshop.zh-CN.md)" in RUNBOOKS["en"].read_text()
    assert "(workshop.md)" in RUNBOOKS["zh"].read_text()
