"""Shared fixtures: tiny random models of each supported class, built offline."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    Phi3Config,
    Phi3ForCausalLM,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
)

TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _with_head_dim(config_cls: type, **family_values):
    """A config builder giving head_dim = hidden_size / heads, as the other families derive it: Qwen3 defaults
    to 128 and Gemma to 256. The families' own values follow: Gemma 2 / 3 slide over 8 tokens (calibration
    windows are longer), and Gemma 3 alternates sliding and full layers (its own RoPE for each)."""

    def build(**values):
        values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
        return config_cls(**{**family_values, **values})

    return build


FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (_with_head_dim(Qwen3Config), Qwen3ForCausalLM),
    "gemma": (_with_head_dim(GemmaConfig), GemmaForCausalLM),
    "gemma2": (_with_head_dim(Gemma2Config, sliding_window=8), Gemma2ForCausalLM),
    "gemma3": (_with_head_dim(Gemma3TextConfig, sliding_window=8, sliding_window_pattern=2), Gemma3ForCausalLM),
    # fused qkv_proj and gate_up_proj: unstructured and whole layers only; its default pad_token_id (32000) lies
    # outside the tiny vocabulary
    "phi3": (_with_head_dim(Phi3Config, pad_token_id=0), Phi3ForCausalLM),
    # Granite 3's multipliers (granite-3.x-2b's values; 1.0 each by default, which would hide them)
    "granite": (
        _with_head_dim(GraniteConfig, residual_multiplier=0.22, embedding_multiplier=12.0, logits_scaling=8.0, attention_multiplier=0.0625),
        GraniteForCausalLM,
    ),
    # post-norms only (no pre-norms) and q/k norms over all heads: heads and SliceGPT are refused
    "olmo2": (Olmo2Config, Olmo2ForCausalLM),
    # LayerNorms and q/k/v biases (StableLM 2 1.6B's layout; tests/adapters/test_stablelm.py adds parallel sublayers
    # and per-head q/k norms): SliceGPT is refused
    "stablelm": (functools.partial(StableLmConfig, use_qkv_bias=True), StableLmForCausalLM),
}


class LargestResult(TorchDispatchMode):
    """While active, ``largest`` is the element count of the largest tensor any torch operation returned: checks that
    a computation builds no intermediate beyond what its inputs need (no timing, no allocator)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        tensors = [t for t in (result if isinstance(result, (tuple, list)) else (result,)) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest] + [t.numel() for t in tensors])
        return result


def owner_only(save_file):
    """``save_file`` (a safetensors writer) as safetensors 0.8 behaves: what it writes is created 0600."""
    import os

    def save_file_0600(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        os.chmod(filename, 0o600)

    return save_file_0600


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **overrides}))
    return model.eval()


_STOCK_RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])
assert "optimum_prune" not in sys.modules, "reload imported optimum_prune"
print(model.config.pruning_config["method"])
"""


def assert_stock_reload_matches(model: torch.nn.Module, directory, ids: torch.Tensor, work_dir) -> str:
    """Reload ``directory`` in a fresh interpreter with stock transformers only (this package never
    imported) and check its logits on ``ids`` equal ``model``'s bit for bit; return the recorded method."""
    import subprocess
    import sys

    work_dir = Path(work_dir)
    torch.save(ids, work_dir / "ids.pt")
    result = subprocess.run(
        [sys.executable, "-c", _STOCK_RELOAD, str(directory), str(work_dir / "ids.pt"), str(work_dir / "logits.pt")],
        capture_output=True, text=True, cwd=work_dir,
    )
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        assert torch.equal(torch.load(work_dir / "logits.pt"), model(input_ids=ids).logits)
    return result.stdout.strip()


def loaded_with_layer_1_on_disk(directory, tmp_path) -> torch.nn.Module:
    """The two-layer checkpoint in ``directory`` loaded as accelerate offloads a model: decoder layer 1 on disk
    (under ``tmp_path``), its parameters on the meta device, loaded by hooks inside each forward."""
    from transformers import AutoModelForCausalLM

    placement = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                 "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(directory, device_map=placement, offload_folder=tmp_path / "offload").eval()
    assert all(parameter.is_meta for parameter in model.model.layers[1].parameters())
    return model


def assert_reloads_exactly(model: torch.nn.Module, directory) -> torch.nn.Module:
    """Reload ``directory`` with ``from_pretrained``: identical state dict, and greedy generation with
    the KV cache equals generation without it and the original model's. Returns the reloaded model."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(directory).eval()
    expected = model.state_dict()
    assert reloaded.state_dict().keys() == expected.keys()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    prompt = token_windows(samples=1, seq_len=6, seed=7)
    cached = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    uncached = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    original = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, uncached) and torch.equal(cached, original)
    return reloaded


def output_errors(
    method: str, sparsity: float, option: str, values=(False, True), windows: torch.Tensor | None = None, dense: torch.nn.Module | None = None
) -> dict:
    """Mean squared logit error against ``dense`` (by default the tiny Llama) after pruning a copy with each value of
    ``option`` (calibrated on ``windows``, by default ``token_windows()``)."""
    import copy

    from optimum_prune import PruningConfig, prune

    windows = token_windows() if windows is None else windows
    dense = tiny_model() if dense is None else dense
    with torch.no_grad():
        reference = dense(input_ids=windows).logits
    errors = {}
    for value in values:
        model = copy.deepcopy(dense)
        prune(model, PruningConfig(method=method, sparsity=sparsity, method_options={option: value}), calibration=windows)
        with torch.no_grad():
            errors[value] = float((model(input_ids=windows).logits - reference).square().mean())
    return errors


def kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which rows of ``original`` survive in ``pruned`` (random weights make every row unique)."""
    return [next(i for i in range(original.shape[0]) if torch.equal(original[i], row)) for row in pruned]


def zeroed_reference(dense: torch.nn.Module, pruned: torch.nn.Module) -> torch.nn.Module:
    """The dense model with the removed heads' o_proj columns and removed channels' down_proj columns zeroed."""
    reference = copy.deepcopy(dense)
    head_dim = dense.model.layers[0].self_attn.head_dim
    with torch.no_grad():
        for before, after in zip(reference.model.layers, pruned.model.layers):
            kept = torch.tensor(kept_rows(before.self_attn.q_proj.weight, after.self_attn.q_proj.weight))
            removed = sorted(set(range(before.self_attn.q_proj.out_features)) - set(kept.tolist()))
            assert len(removed) % head_dim == 0
            before.self_attn.o_proj.weight[:, removed] = 0
            kept = kept_rows(before.mlp.gate_proj.weight, after.mlp.gate_proj.weight)
            before.mlp.down_proj.weight[:, sorted(set(range(before.mlp.gate_proj.out_features)) - set(kept))] = 0
    return reference


def sublayer_removal_logits(dense: torch.nn.Module, adapter_cls: type, index: int, kind: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of ``dense`` with layer ``index``'s ``kind`` sublayer adding nothing (its output zeroed), and those
    of a copy from which ``adapter_cls`` removed that sublayer."""
    layer = dense.model.layers[index]

    def zero(_module: torch.nn.Module, _args: tuple, output):
        return (torch.zeros_like(output[0]), *output[1:]) if isinstance(output, tuple) else torch.zeros_like(output)

    handle = adapter_cls(dense).sublayer(layer, kind).register_forward_hook(zero)
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
    handle.remove()
    model = copy.deepcopy(dense)
    adapter_cls(model).remove_sublayer(model.model.layers[index], kind)
    with torch.no_grad():
        return expected, model(input_ids=ids).logits


def logit_error(dense: torch.nn.Module, windows: torch.Tensor, method: str, **options) -> float:
    """Mean squared logit difference a copy of ``dense`` pruned to 20 % with ``method`` shows on ``windows``."""
    from optimum_prune import PruningConfig, prune  # imported by the tests, after the fixtures they use

    model = copy.deepcopy(dense)
    prune(model, PruningConfig(method=method, sparsity=0.2, method_options=options), calibration=windows)
    with torch.no_grad():
        return float((model(input_ids=windows).logits - dense(input_ids=windows).logits).square().mean())


def assert_prunes_and_reloads(model: torch.nn.Module, config: Any, directory) -> Any:
    """Prune ``model`` with ``config``: unstructured methods reach 50 %, the others shrink it; it reloads exactly."""
    from optimum_prune import prune, save_pruned

    report = prune(model, config, calibration=token_windows())
    if config.method in ("wanda", "sparsegpt", "llm_surgeon"):  # unstructured: zeros, the widths stay
        assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)
    else:
        assert report.parameters_after < report.parameters_before
    assert_reloads_exactly(model, save_pruned(model, directory, report=report))
    return report


def assert_uniform_result_reloads_with_stock_transformers(model: torch.nn.Module, method: str, options: dict, work_dir) -> None:
    """``model`` pruned to 25 % by a structured ``method`` that keeps its layers alike reloads with stock transformers."""
    from optimum_prune import PruningConfig, prune, save_pruned

    report = prune(model, PruningConfig(method=method, sparsity=0.25, method_options=options), calibration=token_windows())
    assert report.parameters_after < report.parameters_before
    directory = save_pruned(model, work_dir / method, report=report)
    assert assert_stock_reload_matches(model, directory, token_windows(samples=2, seq_len=16, seed=3), work_dir) == method


def observed_residual_terms(model: torch.nn.Module) -> tuple[Any, torch.nn.Module, torch.Tensor, dict, dict, torch.Tensor]:
    """Layer 0 of ``model`` run on random states while its adapter observes the stream around each sublayer: the
    adapter, the layer, its input, the arguments it ran with, each sublayer's (before, after) and the layer's output."""
    from optimum_prune import get_adapter

    adapter, layer = get_adapter(model), model.model.layers[0]
    hidden = torch.randn(2, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(8).expand(2, -1)
    arguments = dict(position_embeddings=model.model.rotary_emb(hidden, positions), attention_mask=None, position_ids=positions)
    observed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad(), adapter.observing_residuals(layer, lambda kind, before, after: observed.update({kind: (before, after)})):
        output = adapter.run_layer(layer, hidden, arguments)
    assert torch.equal(observed["attention"][0], hidden)
    assert torch.equal(observed["attention"][1], observed["mlp"][0])
    torch.testing.assert_close(observed["mlp"][1], output)
    return adapter, layer, hidden, arguments, observed, output


def decoder_linear_parameters(model: torch.nn.Module) -> int:
    """Weights of the decoder layers' linears: what a structured ``sparsity`` is a fraction of."""
    return sum(m.weight.numel() for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear))


def console_script(name: str) -> str:
    """This environment's console script (beside ``sys.executable``): the first on PATH may be another install's
    (a pipx copy, another venv), which the test would check instead of this checkout."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name) or name


def token_windows(samples: int = 8, seq_len: int = 32, seed: int = 1, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True, scope="session")
def datasets_cache(tmp_path_factory) -> Path:
    """``datasets`` writes into ~/.cache/huggingface/datasets (LLaMA-Factory's load_dataset an Arrow folder per data
    file and run, ``IterableDataset.from_generator`` lock files): this session's temporary folder holds them instead
    (subprocesses too, through the environment)."""
    import datasets

    cache = tmp_path_factory.mktemp("hf_datasets")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", str(cache))
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        yield cache


@pytest.fixture(autouse=True, scope="session")
def gptqmodel_imported_without_its_environment() -> None:
    """gptqmodel sets HF_HOME, PYTORCH_ALLOC_CONF and more in ``os.environ`` when imported, which peft's first
    ``get_peft_model`` does: imported once here and its variables undone, no test runs under them (the per-test
    restore below cannot undo what a module-scoped fixture's training brought in)."""
    before = dict(os.environ)
    try:
        import gptqmodel  # noqa: F401
    except ImportError:  # not installed: nothing sets them
        pass
    os.environ.clear()
    os.environ.update(before)


@pytest.fixture(autouse=True)
def no_leaked_environment(monkeypatch):
    """Each test's changes to ``os.environ`` are undone after it, whoever made them: transformers'
    ``TrainingArguments`` writes ``ACCELERATE_MIXED_PRECISION`` (one bf16 run made every later Trainer autocast) and
    ``ACCELERATE_DYNAMO_BACKEND`` (``torch_compile=True``: later Trainers compiled), and peft's first
    ``get_peft_model`` imports gptqmodel, which sets ``HF_HOME``, ``PYTORCH_ALLOC_CONF`` and more for the rest of the
    process. Each test starts without mixed precision or compilation."""
    before = dict(os.environ)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    yield
    os.environ.clear()
    os.environ.update(before)


@pytest.fixture
def scratch_methods():
    """The method registry, for methods a test registers (a plugin's): restored after the test."""
    from optimum_prune import METHODS

    with METHODS.restored_after():
        yield


@pytest.fixture
def scratch_adapters():
    """The adapter registry, for adapters a test registers: restored after the test."""
    from optimum_prune.adapters import ADAPTERS

    with ADAPTERS.restored_after():
        yield


@pytest.fixture
def llama() -> torch.nn.Module:
    return tiny_model("llama")


@pytest.fixture
def windows() -> torch.Tensor:
    return token_windows()


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A real byte-level BPE tokenizer trained offline on the bundled text (vocab = TINY vocab_size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    from optimum_prune.data import wikipedia_articles

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY["vocab_size"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    tokenizer.train_from_iterator(wikipedia_articles("calibration")[:5], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture
def model_dir(tmp_path, bpe_tokenizer):
    """A tiny Llama checkpoint with a real tokenizer, as a directory."""
    directory = tmp_path / "tiny"
    tiny_model().save_pretrained(directory)
    bpe_tokenizer.save_pretrained(directory)
    return directory
