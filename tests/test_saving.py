import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from optimum_prune import PruningConfig, prune, save_pruned

from .conftest import tiny_model, token_windows

RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
assert "optimum_prune" not in sys.modules, "reload imported optimum_prune"
print(model.config.pruning_config["method"])
"""


def test_reload_without_package_is_bit_exact(tmp_path):
    model = tiny_model()
    config = PruningConfig(method="sparsegpt", sparsity="2:4")
    prune(model, config, calibration=token_windows())
    output = save_pruned(model, tmp_path / "pruned")

    assert sorted(p.name for p in output.iterdir()) == ["config.json", "generation_config.json", "model.safetensors", "pruning_config.json"]
    assert PruningConfig.from_json_file(output / "pruning_config.json") == config
    assert PruningConfig.from_dict(json.loads((output / "config.json").read_text())["pruning_config"]) == config
    saved = load_file(output / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], tensor), name

    ids = token_windows(samples=2, seq_len=16)
    torch.save(ids, tmp_path / "ids.pt")
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, str(output), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sparsegpt"
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_interrupted_save_keeps_previous_output(tmp_path, monkeypatch):
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    output = save_pruned(model, tmp_path / "pruned")
    before = {p.name: p.read_bytes() for p in output.iterdir()}

    def crash(directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, output)
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no staging directory left behind
