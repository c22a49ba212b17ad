"""Tiny random LLaVA models (real transformers classes) and a real processor, built offline."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from tests.conftest import TINY

IMAGE_SIZE, PATCH = 32, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # the CLS feature is dropped ("default" strategy)


def tiny_llava(image_token_id: int, seed: int = 0) -> LlavaForConditionalGeneration:
    text = LlamaConfig(**{**TINY, "vocab_size": image_token_id + 1})
    vision = CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=48,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id, vision_feature_layer=-1)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="session")
def llava_processor(bpe_tokenizer) -> LlavaProcessor:
    return tiny_llava_processor(bpe_tokenizer)


def tiny_llava_processor(bpe_tokenizer) -> LlavaProcessor:
    """A real LLaVA processor over the offline tokenizer, with its ``<image>`` token added."""
    tokenizer = bpe_tokenizer.__class__(
        tokenizer_object=bpe_tokenizer.backend_tokenizer, eos_token="<eos>", pad_token="<eos>",
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
    )


@pytest.fixture
def llava(llava_processor) -> LlavaForConditionalGeneration:
    return tiny_llava(llava_processor.tokenizer.convert_tokens_to_ids("<image>"))
