"""``optimum-cli export onnx`` (optimum-onnx) of pruned checkpoints, checked with onnxruntime."""

import subprocess

import pytest
import torch

from optimum_prune import PruningConfig, export_onnx, prune, save_pruned

from .conftest import console_script, tiny_model, token_windows

onnxruntime = pytest.importorskip("optimum.onnxruntime")

CASES = {
    "2:4": ("llama", {}, [PruningConfig(method="wanda", sparsity="2:4")]),
    "uniform width": ("llama", {}, [PruningConfig(method="width", sparsity=0.25, method_options={"criterion": "wanda_sp"})]),
    "non-uniform widths, removed MLP": (
        "qwen2",
        {"num_hidden_layers": 4},
        [
            PruningConfig(method="width", sparsity=0.25, method_options={"ranking": "global"}),
            PruningConfig(method="sublayers", sparsity=0.2, method_options={"sublayers": "mlp"}),
        ],
    ),
    "qwen3 (q/k norms), uniform width": (
        "qwen3", {}, [PruningConfig(method="width", sparsity=0.25, method_options={"criterion": "wanda_sp"})]
    ),
    "slicegpt, tied embeddings": ("llama", {"tie_word_embeddings": True}, [PruningConfig(method="slicegpt", sparsity=0.25)]),
    "gemma, slicegpt (1 + weight norms)": ("gemma", {}, [PruningConfig(method="slicegpt", sparsity=0.25)]),
    "gemma3 (sandwich norms), uniform width and layers": (
        "gemma3",
        {"num_hidden_layers": 4},
        [PruningConfig(method="width", sparsity=0.25, method_options={"criterion": "wanda_sp"}), PruningConfig(method="layers", sparsity=0.25)],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_optimum_cli_exports_pruned_checkpoints_that_onnxruntime_runs_alike(case, tmp_path):
    family, overrides, configs = CASES[case]
    model = tiny_model(family, **overrides)
    for config in configs:
        prune(model, config, calibration=token_windows())
    checkpoint = save_pruned(model, tmp_path / "pruned")

    cli = console_script("optimum-cli")
    result = subprocess.run(
        [cli, "export", "onnx", "--model", str(checkpoint), "--task", "text-generation-with-past", str(tmp_path / "onnx")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]

    exported = onnxruntime.ORTModelForCausalLM.from_pretrained(tmp_path / "onnx")
    ids = token_windows(samples=2, seq_len=12, seed=3)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    logits = exported(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    prompt = ids[:1, :6]
    assert torch.equal(
        exported.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0),
        model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0),
    )


def test_per_layer_key_value_heads_are_refused_with_the_reason(tmp_path):
    model = tiny_model("qwen2", num_hidden_layers=4)
    prune(model, PruningConfig(method="sublayers", sparsity=0.1, method_options={"sublayers": "attention"}), calibration=token_windows())
    checkpoint = save_pruned(model, tmp_path / "no-attention")
    with pytest.raises(ValueError, match=r"key/value heads differ from the config's 2 in layer \d \(0\).*head_mode='query'"):
        export_onnx(checkpoint, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_heads_removed_alike_in_every_layer_are_refused_with_what_exports(tmp_path):
    """The config then says 2 heads of 16 in a 64-wide model: onnxruntime sized the cache by 64 // 2 and failed at
    the first forward (the export itself was accepted)."""
    model = tiny_model()
    prune(model, PruningConfig(method="width", sparsity=0.1, method_options={"criterion": "wanda_sp", "components": "attention"}),
          calibration=token_windows())  # fmt: skip
    assert model.config.num_attention_heads < 4 and model.config.head_dim == 16
    with pytest.raises(ValueError, match=r"head_dim 16 is not hidden_size // num_attention_heads .* ranking='global' \(the config keeps"):
        export_onnx(save_pruned(model, tmp_path / "narrow"), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_gemma_reads_its_head_dim_so_heads_removed_alike_export(tmp_path):
    """optimum-onnx sizes a Gemma / Gemma 3 cache by the config's head_dim: the narrower config runs."""
    model = tiny_model("gemma")
    prune(model, PruningConfig(method="width", sparsity=0.1, method_options={"criterion": "wanda_sp", "components": "attention"}),
          calibration=token_windows())  # fmt: skip
    assert model.config.num_attention_heads * model.config.head_dim < model.config.hidden_size
    exported = onnxruntime.ORTModelForCausalLM.from_pretrained(export_onnx(save_pruned(model, tmp_path / "narrow"), tmp_path / "onnx"))
    prompt = token_windows(samples=1, seq_len=6, seed=8)
    assert torch.equal(
        exported.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0),
        model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0),
    )


def test_grouped_query_gemma2_is_refused_as_optimum_onnxs_limit(tmp_path):
    """ORTModelForCausalLM gives Gemma 2 one key/value head per query head: even the dense model fails to generate."""
    model = tiny_model("gemma2")
    with pytest.raises(ValueError, match=r"gemma2 a cache of num_attention_heads \(4\) key/value heads, not its num_key_value_heads \(2\).*pruned or not"):
        export_onnx(save_pruned(model, tmp_path / "dense"), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_export_onnx_python_api_runs_in_onnxruntime_like_the_pruned_model(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    prune(model, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    output = export_onnx(save_pruned(model, tmp_path / "sliced"), tmp_path / "onnx")
    exported = onnxruntime.ORTModelForCausalLM.from_pretrained(output)
    ids = token_windows(samples=1, seq_len=10, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_export_without_optimum_onnx_names_the_extra(tmp_path, monkeypatch):
    """Every other optional feature names its extra; this raised a bare ModuleNotFoundError for optimum.exporters.onnx."""
    import sys

    from optimum_prune.dependencies import MissingDependency

    monkeypatch.setitem(sys.modules, "optimum.exporters.onnx", None)  # optimum-onnx not installed
    with pytest.raises(MissingDependency, match=r"pip install 'optimum-prune\[onnx\]'"):
        export_onnx(tmp_path / "checkpoint", tmp_path / "onnx")


def test_export_onnx_refuses_to_replace_the_checkpoint_it_exports(tmp_path):
    pytest.importorskip("optimum.exporters.onnx")
    from optimum_prune import export_onnx, prune, save_pruned

    model = tiny_model()
    prune(model, {"method": "magnitude", "sparsity": 0.5})
    checkpoint = save_pruned(model, tmp_path / "pruned")
    with pytest.raises(ValueError, match="checkpoint"):  # was: returns, and pruned/ holds model.onnx only
        export_onnx(checkpoint, checkpoint)
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "pruning_config.json").is_file()
