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
    body = text[text.index("<!-- table: main_run -->"):]
    edited = tmp_path / "README.md"
    row = re.search(r"\n\| 1 \| \d\.\d{3}", body).group(0)  # stage 1's ID accuracy
    edited.write_text(text.replace(row, row[:-5] + "9.999", 1), encoding="utf-8")
    with pytest.raises(SystemExit, match="tables differ"):
        readme_tables.main(["--check", "--readme", str(edited)])
