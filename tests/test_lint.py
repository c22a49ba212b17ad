"""The whole tree passes ruff's pyflakes checks (pyproject.toml's ``[tool.ruff.lint]``).

The benchmarks and scripts run no test of their own, and some only on a GPU: an undefined name
there would otherwise surface in the middle of a benchmark run (as one in ``benchmarks/scale.py``
did)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ruff", reason="ruff is a dev dependency (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parent.parent


def test_the_tree_has_no_undefined_names_or_unused_imports():
    checked = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", str(ROOT)],
        capture_output=True, text=True, check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
