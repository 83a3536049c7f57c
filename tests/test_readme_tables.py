"""The README's measured tables are exactly what bench/readme_tables.py makes from bench/results."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import readme_tables  # noqa: E402


def test_readme_tables_match_committed_results():
    blocks = readme_tables.PATTERN.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    assert sorted(b[1] for b in blocks) == sorted(readme_tables.BLOCKS)  # every block is in the README, once
    readme_tables.main(["--check"])


def test_a_hand_edited_number_is_caught(tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    numbers = [b.start(3) + m.start(1) for b in readme_tables.PATTERN.finditer(text)
               for m in [re.search(r"\n\|[^\n]*?(\d\.\d\d)", b.group(3))] if m]  # first table number of each block
    assert numbers, "no generated table row with a number in README.md"
    number_at = numbers[0]
    edited = tmp_path / "README.md"
    edited.write_text(text[:number_at] + "9.99" + text[number_at + 4:], encoding="utf-8")
    with pytest.raises(SystemExit, match="tables differ"):
        readme_tables.main(["--check", "--readme", str(edited)])
