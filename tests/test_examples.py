"""The Python examples run end to end as a user runs them (a fresh interpreter, small sizes) and
print what they promise: reloads with identical weights, sparsity kept through LoRA merges, the
compressed 2:4 model equal to the masked dense one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the real SmolLM2-135M (its tokenizer, for the MoE example)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["--samples", "4", "--seq-len", "128"]


def run_example(name: str, *args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def perplexities(output: str) -> list[float]:
    return [float(value) for value in re.findall(r"perplexity[^\n]*?(\d+\.\d+) → [^\n]*?(\d+\.\d+)", output)[0]]


def test_every_python_example_is_tested():
    assert {path.name for path in EXAMPLES.glob("*.py")} == {"prune.py", "lora_recovery.py", "moe_experts.py", "prune_then_quantize.py", "sparse_inference.py"}


@pytest.mark.parametrize("method,sparsity,expected", [("wanda", "2:4", "2:4 everywhere: True"), ("width", "0.2", "zeros in linears: 0.0%")])
def test_prune_saves_what_stock_transformers_reloads(tmp_path, method, sparsity, expected):
    output = run_example("prune.py", "--method", method, "--sparsity", sparsity, *SMALL, "--eval-tokens", "1024", "--output", "out", cwd=tmp_path)
    assert expected in output and "reloaded weights identical: True" in output
    dense, pruned = perplexities(output)
    assert dense < pruned
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["pruning_config"]["method"] == method


def test_lora_recovery_keeps_the_pattern_through_the_merge(tmp_path):
    output = run_example("lora_recovery.py", *SMALL, "--steps", "4", "--batch-size", "2", "--eval-tokens", "1024", "--output", "out", cwd=tmp_path)
    assert "zeros in linears after the merge: 50.0%, 2:4 everywhere: True" in output
    assert not any(path.name.startswith("adapter") for path in (tmp_path / "out").iterdir())  # merged, not an adapter
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pruning_config"]["sparsity"] == "2:4"
    # The recovered checkpoint goes to the 2:4 format as it is (no second pruning).
    output = run_example("sparse_inference.py", "--model", "out", "--new-tokens", "2", cwd=tmp_path)
    assert "the model is 2:4 already: used as it is" in output and "same top-1 token at 100% of positions" in output


def test_moe_experts_prunes_merges_and_reloads(tmp_path):
    small = [*SMALL, "--eval-tokens", "512"]
    output = run_example("moe_experts.py", "--random-mixtral", "--method", "merge_experts", "--beta", "0.3", *small, "--output", "merged", cwd=tmp_path)
    assert "with 4 experts per layer; reloaded weights identical: True" in output
    assert re.search(r"skipping at beta 0.30, 0.30, 0.30, 0.30: \d+\.\d% of expert calls skipped", output)
    # A checkpoint on disk (the merged one) through --model, pruned again by routing frequency.
    output = run_example("moe_experts.py", "--model", "merged", "--keep", "2", "--criterion", "frequency", *small, "--output", "pruned", cwd=tmp_path)
    assert "with 2 experts per layer; reloaded weights identical: True" in output
    assert re.search(r"skipping at beta (0\.\d\d, ){3}0\.\d\d: \d+\.\d% of expert calls skipped", output)  # each layer's median
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["num_local_experts"] == 2


def test_prune_then_quantize_keeps_the_pattern_and_repacks_exactly(tmp_path):
    output = run_example("prune_then_quantize.py", "--quantization", "quanto-int8", *SMALL, "--eval-tokens", "512", "--output", "out", cwd=tmp_path)
    assert "2:4 everywhere: True" in output and "reloaded with the quantizer's loader, logits identical: True" in output
    assert "210 of them repacked from their quantized codes" in output
    assert "largest logit difference to the quantized model 0.0e+00" in output  # float32: the same codes and scales
    assert (tmp_path / "out" / "quanto_qmap.json").is_file()


def test_sparse_inference_matches_the_masked_dense_model(tmp_path):
    output = run_example("sparse_inference.py", *SMALL, "--new-tokens", "4", cwd=tmp_path)
    assert "sparsify: 210 linears in the 2:4 format" in output and "0 left dense" in output
    assert "largest difference 0.0e+00 of the largest logit, same top-1 token at 100% of positions" in output  # float32: exact
    dense, sparse = re.findall(r"\((?:[\d.]+) tokens/s on cpu\): (.*)", output)
    assert dense == sparse  # the same greedy tokens
