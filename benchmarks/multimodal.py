"""Pruning each part of a LLaVA-style model: language tower, vision encoder, projector.

No small real LLaVA checkpoint is installable. This benchmark builds a ``LlavaForConditionalGeneration``
whose language tower is SmolLM2-135M-Instruct (the real model, so text quality is measurable)
with a 4-layer CLIP-style vision encoder and the LLaVA MLP projector. A random vision tower makes
image conditioning meaningless, so the tower and projector are first trained LLaVA stage-1 style
(language tower frozen) to caption the bundled photographs (``optimum_prune.data.images``,
calibration captions) — a few minutes on CPU, cached. It then reports, before and after pruning
each part:

- language perplexity on the bundled Wikipedia evaluation split (text only);
- image-conditioned caption loss: mean NLL (nats) of the *evaluation* captions given their image,
  and with the images shuffled among the captions (the gap is what the image contributes).

    python benchmarks/multimodal.py            # writes benchmarks/MULTIMODAL.md
    python benchmarks/multimodal.py --quick    # fewer training steps and evaluation tokens
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from common import cached_training_seconds, quick_or_full, save_training, table_header, training_cache
from optimum_prune import PruningConfig, evaluate_image_text_loss, evaluate_perplexity, load_default_model, prune
from optimum_prune.calibration import calibration_windows, image_text_batches
from optimum_prune.data.images import image_text_pairs

IMAGE_SIZE, PATCH = 96, 16
VISION = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH)
TEXT_WINDOWS, TEXT_SEQ_LEN = 16, 512
ALL_PARTS = {"vision": {}, "projector": {}, "language": {}}
# (row, method, sparsity, parts, calibration: "pairs" | "text" | "mixed")
ROWS = [
    ("language · image-text calibration", "wanda", 0.5, {"language": {}}, "pairs"),
    ("language · text calibration", "wanda", 0.5, {"language": {}}, "text"),
    ("language · image-text + text calibration", "wanda", 0.5, {"language": {}}, "mixed"),
    ("vision encoder", "wanda", 0.5, {"vision": {}}, "pairs"),
    ("vision encoder · magnitude", "magnitude", 0.5, {"vision": {}}, "pairs"),
    ("projector", "wanda", 0.5, {"projector": {}}, "pairs"),
    ("all parts", "wanda", 0.5, ALL_PARTS, "mixed"),
    ("all parts · 2:4", "wanda", "2:4", ALL_PARTS, "mixed"),
    ("all parts · 2:4 · SparseGPT", "sparsegpt", "2:4", ALL_PARTS, "mixed"),
]

NOTES = [
    "",
    "Notes:",
    "- The vision tower and projector learn from 18 captions only, so they memorise them (training loss far below the "
    "held-out caption loss); the image gain on the held-out captions is what carries over. Pruning those parts can lower "
    "the absolute held-out loss (less confident in the calibration wording) while shrinking the image gain.",
    "- `pairs` alone is about a thousand tokens: enough for the vision encoder and projector, too few for the 30 language "
    "layers; `mixed` adds the Wikipedia windows, which the text-only perplexity needs and the image gain survives better.",
    "- Vision and projector rows leave the language perplexity unchanged by construction (text-only input never runs them).",
]


def build_llava() -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """SmolLM2 as the language tower (one added ``<image>`` token), a fresh vision tower and projector."""
    language, tokenizer = load_default_model()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    language.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=language.config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,  # every encoder layer feeds the projector (LLaVA's -2 leaves the last one unused)
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(language.model.state_dict())
    model.lm_head.load_state_dict(language.lm_head.state_dict())
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
    )  # fmt: skip
    return model, processor


def trained_llava(steps: int) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, float]:
    """The model after ``steps`` of stage-1 training on the calibration captions (cached); returns training seconds."""
    directory = training_cache("tiny-llava-smollm2", [VISION, IMAGE_SIZE, steps])
    seconds = cached_training_seconds(directory)
    if seconds is not None:
        model = LlavaForConditionalGeneration.from_pretrained(directory).eval()
        return model, LlavaProcessor.from_pretrained(directory), seconds
    model, processor = build_llava()
    batch, labels = caption_batch(processor, model.config.image_token_id)
    trained = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    model.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"training step {step}/{steps}: caption loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - started
    save_training(directory, steps, seconds, model.eval(), processor)
    return model, processor, seconds


def caption_batch(processor: LlavaProcessor, image_token_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """All calibration pairs in one right-padded batch; labels score only the caption tokens."""
    pairs = image_text_pairs("calibration")
    processor.tokenizer.padding_side = "right"
    batch = processor(
        images=[p["image"] for p in pairs], text=[f"<image>\n{p['text']}" for p in pairs], padding=True, return_tensors="pt"
    )
    labels = batch["input_ids"].clone()
    last_image = (labels == image_token_id).int().cumsum(dim=1).argmax(dim=1, keepdim=True)  # first position of the max
    labels[(torch.arange(labels.shape[1]) <= last_image) | (batch["attention_mask"] == 0)] = -100
    return dict(batch), labels


def measure(model: LlavaForConditionalGeneration, processor: LlavaProcessor, eval_tokens: int) -> dict[str, float]:
    pairs = image_text_pairs("evaluation")
    shuffled = [{"image": pairs[(i + 1) % len(pairs)]["image"], "text": pair["text"]} for i, pair in enumerate(pairs)]
    return {
        "perplexity": evaluate_perplexity(model, processor.tokenizer, seq_len=512, max_tokens=eval_tokens),
        "caption_loss": evaluate_image_text_loss(model, processor, pairs),
        "shuffled_loss": evaluate_image_text_loss(model, processor, shuffled),
    }


def main() -> None:
    quick, output = quick_or_full(__doc__.splitlines()[0], "MULTIMODAL", "15 training steps, 4,096 evaluation tokens")
    steps, eval_tokens = (15, 4096) if quick else (100, 16384)

    dense, processor, train_seconds = trained_llava(steps)
    pairs = image_text_batches(image_text_pairs("calibration"), processor, num_samples=100)
    text = [{"input_ids": w[None]} for w in calibration_windows(None, processor.tokenizer, TEXT_WINDOWS, TEXT_SEQ_LEN, seed=0)]
    calibrations = {"pairs": pairs, "text": text, "mixed": [*pairs, *text]}

    results = [("dense", "", {**measure(dense, processor, eval_tokens), "sparsity": {}})]
    print(results[-1], flush=True)
    for row, method, sparsity, parts, calibration in ROWS:
        model = copy.deepcopy(dense)
        config = PruningConfig(method=method, sparsity=sparsity, parts=parts)
        report = prune(model, config, calibrations[calibration])
        measured = {part: report.part_sparsity(part) for part in report.parts}
        results.append((row, calibration, {**measure(model, processor, eval_tokens), "sparsity": measured, "seconds": report.seconds}))
        print(results[-1], flush=True)

    command = "python benchmarks/multimodal.py" + (" --quick" if quick else "")
    lines = [
        *table_header(
            "Multimodal pruning benchmark: LLaVA with a SmolLM2-135M language tower (fp32, CPU)",
            command,
            f"Model: `LlavaForConditionalGeneration` = SmolLM2-135M-Instruct language tower + CLIP-style vision encoder "
            f"({VISION['num_hidden_layers']} layers, width {VISION['hidden_size']}, {IMAGE_SIZE}px images, "
            f"{(IMAGE_SIZE // PATCH) ** 2} image tokens) + 2-layer MLP projector. Vision tower and projector trained "
            f"{steps} full-batch AdamW steps on the 18 calibration captions of the bundled photographs, language tower "
            f"frozen ({train_seconds / 60:.1f} min, cached). Calibration: `pairs` = those 18 image-caption pairs; `text` = "
            f"{TEXT_WINDOWS} × {TEXT_SEQ_LEN} Wikipedia calibration tokens (seed 0); `mixed` = both. Language perplexity: "
            f"first {eval_tokens:,} tokens of the Wikipedia evaluation split, 512-token windows. Caption loss: mean NLL "
            "(nats/token) of the 18 *evaluation* captions given their own image; shuffled: given another photograph's "
            "image — the gap is what the image contributes. Sparsity is measured zeros of the pruned parts' linears.",
        ),
        "| pruned | calibration | measured sparsity | language PPL | caption loss | shuffled images | image gain | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, calibration, r in results:
        sparsity = ", ".join(f"{part} {value:.1%}" for part, value in r["sparsity"].items()) or "—"
        seconds = f"{r['seconds']:.0f}" if "seconds" in r else ""
        lines.append(
            f"| {row} | {calibration} | {sparsity} | {r['perplexity']:.2f} | {r['caption_loss']:.3f} | "
            f"{r['shuffled_loss']:.3f} | {r['shuffled_loss'] - r['caption_loss']:.3f} | {seconds} |"
        )
    lines += NOTES
    output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
