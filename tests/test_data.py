import lzma
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_shipped_text_is_reproducible_from_gensim():
    pytest.importorskip("gensim")
    pytest.importorskip("mwparserfromhell")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from build_wikipedia_text import TARGET, build
    finally:
        sys.path.pop(0)
    assert lzma.decompress(TARGET.read_bytes()).decode("utf-8") == build()
