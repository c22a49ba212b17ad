"""LLaMA-Factory datasets made from the bundled Wikipedia excerpt (real text, no download).

``write_wikipedia_datasets(data_dir)`` writes, from the calibration split only (perplexity is
measured on the evaluation split):

- ``wiki_pt`` — one record per paragraph, ``{"text": ...}``, for ``stage: pt`` and calibration;
- ``wiki_sft`` — alpaca-style instructions built from the articles: write an article's opening
  paragraph from its title, and continue a passage with the paragraph that follows it;

and a ``dataset_info.json`` registering both, so YAMLs name them like any LLaMA-Factory dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from optimum_prune.data import wikipedia_articles

DATASET_INFO = {
    "wiki_pt": {"file_name": "wiki_pt.json", "columns": {"prompt": "text"}},
    "wiki_sft": {"file_name": "wiki_sft.json", "columns": {"prompt": "instruction", "query": "input", "response": "output"}},
}
MAX_PARAGRAPH_CHARS = 700


def _paragraphs(article: str) -> tuple[str, list[str]]:
    title_line, _, body = article.partition("\n")
    paragraphs = [p.strip() for p in body.split("\n") if len(p.strip()) > 80 and not p.startswith("=")]
    return title_line.strip("= ").strip(), [p[:MAX_PARAGRAPH_CHARS] for p in paragraphs]


def wikipedia_records() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(pt records, sft records) from the calibration split."""
    pretraining, instructions = [], []
    for article in wikipedia_articles("calibration"):
        title, paragraphs = _paragraphs(article)
        if not paragraphs:
            continue
        pretraining.extend({"text": paragraph} for paragraph in paragraphs)
        instructions.append(
            {"instruction": f'Write the opening paragraph of a Wikipedia article titled "{title}".', "input": "", "output": paragraphs[0]}
        )
        for previous, following in zip(paragraphs[:4], paragraphs[1:5]):
            instructions.append(
                {"instruction": f'Continue this passage from the Wikipedia article "{title}".', "input": previous, "output": following}
            )
    return pretraining, instructions


def write_wikipedia_datasets(data_dir: str | os.PathLike) -> Path:
    """Write both datasets and their ``dataset_info.json`` into ``data_dir``; return it."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    pretraining, instructions = wikipedia_records()
    for name, records in (("wiki_pt", pretraining), ("wiki_sft", instructions)):
        (data_dir / DATASET_INFO[name]["file_name"]).write_text(json.dumps(records, ensure_ascii=False, indent=0), encoding="utf-8")
    (data_dir / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=2), encoding="utf-8")
    return data_dir
