"""Real text bundled with the package: an excerpt of English Wikipedia.

``wikipedia_excerpt.txt.xz`` holds 93 articles cleaned from the dump excerpt that the gensim
wheel ships (``tools/build_wikipedia_text.py`` rebuilds it byte for byte). Wikipedia text is
licensed CC BY-SA 3.0 / GFDL; authors are listed in each article's history on wikipedia.org.

Articles are split deterministically: every fourth article (index ≡ 3 mod 4) is the evaluation
split, the rest the calibration split, so the two never share text.
"""

from __future__ import annotations

import lzma
from functools import lru_cache
from importlib import resources

SPLITS = ("calibration", "evaluation")
EVALUATION_EVERY = 4


@lru_cache(maxsize=1)
def wikipedia_excerpt() -> tuple[str, ...]:
    """Every article of the excerpt, in its order (both splits; for studies of the split itself)."""
    text = lzma.decompress(resources.files(__name__).joinpath("wikipedia_excerpt.txt.xz").read_bytes()).decode("utf-8")
    return tuple(text.strip("\n").split("\n\n"))


def wikipedia_articles(split: str) -> list[str]:
    """Articles of the ``calibration`` or ``evaluation`` split, each starting with a ``= Title =`` line."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    is_eval = split == "evaluation"
    return [a for i, a in enumerate(wikipedia_excerpt()) if (i % EVALUATION_EVERY == EVALUATION_EVERY - 1) == is_eval]


def wikipedia_text(split: str) -> str:
    """The bundled Wikipedia ``split``'s articles as one text, joined by blank lines."""
    return "\n\n".join(wikipedia_articles(split))
