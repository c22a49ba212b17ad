"""README.md renders as written: GitHub-flavoured Markdown ends a table row at its line break."""

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_each_table_row_is_one_line():
    """A row continued on the next line became a row of its own (its text in the first column), and the row before
    it lost its end (the kprune and low_rank rows of the structured methods' table)."""
    broken, in_table = [], False
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith(("|---", "| ---")):
            in_table = True
        elif in_table and not line.strip():
            in_table = False
        elif in_table and not line.startswith("|"):
            broken.append(number)
    assert not broken, f"README table rows continued on lines {broken}"
