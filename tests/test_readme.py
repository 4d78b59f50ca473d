"""the Chinese README keeps in step with the English one: the same sections, in the same order."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGLISH, CHINESE = ROOT / "README.md", ROOT / "README.zh-CN.md"


def heading_levels(path: Path) -> list[int]:
    """the level of every markdown heading, in order, leaving out lines inside code blocks."""
    levels, in_code = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (heading := re.match(r"(#{1,6}) ", line)):
            levels.append(len(heading.group(1)))
    return levels


def test_the_chinese_readme_has_every_section_of_the_english_one():
    assert heading_levels(ENGLISH) and heading_levels(CHINESE) == heading_levels(ENGLISH)


def test_each_readme_links_the_other_at_the_top():
    for path, other in [(ENGLISH, CHINESE), (CHINESE, ENGLISH)]:
        top = path.read_text(encoding="utf-8").splitlines()[:5]
        assert any(f"]({other.name})" in line for line in top), (
            f"{path.name} does not link {other.name} at the top"
        )
