"""Dense vs magnitude 50 % perplexity of SmolLM2-135M on other choices of evaluation text (issue 3's sanity point).

The issue quotes dense ≈ 22.2 and magnitude 50 % ≈ 357 "on this protocol"; RESULTS.md measures
22.27 and 400.2 on the library's evaluation split (every fourth article of the bundled Wikipedia
excerpt). An independent measurement needs its own disjoint split of the same excerpt, and a
model pruned by magnitude is far more sensitive to which text it reads than the dense one. This
script measures that spread: the same two models (dense, magnitude 50 % ranked within each
matrix — both data-free, so no split overlaps their calibration) evaluated on each residue of the
article index mod 4 and on the first and last quarter of the articles, first 65,536 tokens of
each in 512-token windows. Finished rows are cached; a rerun resumes.

    python benchmarks/eval_split.py            # full protocol, writes benchmarks/EVAL_SPLIT.md
    python benchmarks/eval_split.py --quick    # 4,096 eval tokens
"""

from __future__ import annotations

import json
import math
import statistics

from common import measured, measured_with, quick_or_full, save_rows, table_header
from optimum_prune import PruningConfig, evaluate_perplexity, load_default_model, prune
from optimum_prune.data import EVALUATION_EVERY, wikipedia_excerpt

LIBRARY_SPLIT = f"articles i ≡ {EVALUATION_EVERY - 1} mod {EVALUATION_EVERY} (library's evaluation split)"
STAGES = ("dense", "magnitude 50 %")


def evaluation_texts() -> dict[str, list[str]]:
    """Candidate evaluation texts, each a list of whole articles in excerpt order."""
    articles = wikipedia_excerpt()
    quarter = math.ceil(len(articles) / 4)
    texts = {
        (LIBRARY_SPLIT if residue == EVALUATION_EVERY - 1 else f"articles i ≡ {residue} mod {EVALUATION_EVERY}"): [
            article for i, article in enumerate(articles) if i % EVALUATION_EVERY == residue
        ]
        for residue in range(EVALUATION_EVERY)
    }
    texts["first quarter of the articles"] = list(articles[:quarter])
    texts["last quarter of the articles"] = list(articles[-quarter:])
    return texts


def main() -> None:
    quick, output = quick_or_full(__doc__.splitlines()[0], "EVAL_SPLIT", "4,096 eval tokens")
    eval_tokens = 4096 if quick else 65536
    cache = output.with_suffix(".json")
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    texts = evaluation_texts()
    model, tokenizer = load_default_model()
    for stage in STAGES:
        if stage != "dense":
            prune(model, PruningConfig(method="magnitude", sparsity=0.5))
        for name, articles in texts.items():
            row = done.setdefault(name, {"articles": len(articles)})
            if stage not in row:
                row[stage] = evaluate_perplexity(model, tokenizer, articles, seq_len=512, max_tokens=eval_tokens)
                row.setdefault("measured", {})[stage] = measured({})  # per value: a rerun may add one stage of a row
                save_rows(cache, done)
            print(f"{stage:<15} {name:<55} {row[stage]:.2f}", flush=True)
    rows = {name: done[name] for name in texts}  # the cache may hold texts this script no longer cuts
    magnitude = [row["magnitude 50 %"] for row in rows.values()]
    dense = [row["dense"] for row in rows.values()]
    lines = [
        *table_header(
            "Dense vs magnitude 50 % across evaluation texts (SmolLM2-135M-Instruct)",
            "python benchmarks/eval_split.py" + (" --quick" if quick else ""),
            f"One fp32 model evaluated dense, then pruned to 50 % by magnitude (|W| ranked within each matrix, "
            f"embeddings and lm_head dense) and evaluated again, on each text: the first {eval_tokens:,} tokens of its "
            f"articles joined by blank lines, in 512-token windows. The {len(texts)} texts are cut from the same "
            f"bundled Wikipedia excerpt ({len(wikipedia_excerpt())} articles); the two quarters overlap the residue texts.",
        ),
        "| evaluation text | articles | dense | magnitude 50 % | ratio |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | {row['articles']} | {row['dense']:.2f} | {row['magnitude 50 %']:.2f} | "
            f"{row['magnitude 50 %'] / row['dense']:.1f}× |"
            for name, row in rows.items()
        ],
        "",
        f"Spread over the {len(rows)} texts: dense {min(dense):.2f}–{max(dense):.2f} "
        f"(max/min {max(dense) / min(dense):.3f}), magnitude 50 % {min(magnitude):.2f}–{max(magnitude):.2f} "
        f"(max/min {max(magnitude) / min(magnitude):.3f}); median magnitude {statistics.median(magnitude):.2f}.",
        "",
        measured_with((row.get("measured", {}).get(stage, {}) for row in rows.values() for stage in STAGES), "value"),
    ]
    output.write_text("\n".join(lines) + "\n")
    print(output.read_text())


if __name__ == "__main__":
    main()
