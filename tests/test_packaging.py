"""The package as pip installs it from a wheel, not from the checkout."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_carries_every_subpackage(tmp_path):
    """A normal (non-editable) install gets the engine and the HTTP layer, not only the top."""
    # setuptools builds inside the source tree: a copy keeps the checkout clean
    source = tmp_path / "source"
    skipped = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "tutorial_api", source / "tutorial_api", ignore=skipped)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*build, "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=source,
    )
    [wheel] = tmp_path.glob("tutorial_api-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(path.relative_to(ROOT)) for path in (ROOT / "tutorial_api").rglob("*.py")}
    assert sources <= packed, sorted(sources - packed)
    assert {"tutorial_api/engine/engine.py", "tutorial_api/web/app.py"} <= packed
