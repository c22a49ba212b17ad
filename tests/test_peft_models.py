"""A model wrapped by peft (LoRA): what prune, save_pruned and verify_sparsity make of it."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from optimum_prune import PruningConfig, merge_lora_preserving_sparsity, prune, save_pruned, verify_sparsity

from .conftest import tiny_model, token_windows

LORA = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"])


def test_prune_refuses_a_model_with_adapters_before_any_change():
    """The adapters' linears were pruned and counted as the model's (33 linears for 21, a 50 %-zero lora_A), and
    entered structured budgets and sensitivity traces."""
    model = get_peft_model(tiny_model(), LORA)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for config in (PruningConfig(method="wanda", sparsity=0.5), PruningConfig(method="width", sparsity=0.25)):
        with pytest.raises(ValueError, match=r"q_proj holds a peft adapter \(9 such layers\): prune the model before get_peft_model"):
            prune(model, config, calibration=token_windows(4, 16))
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_save_pruned_refuses_a_model_with_adapters_and_saves_its_sparse_merge(tmp_path):
    """A peft model's save_pretrained wrote the adapter only: the folder reloaded as the dense model it was made from,
    beside a pruning_config.json saying it was pruned."""
    base = tiny_model()
    prune(base, PruningConfig(method="magnitude", sparsity=0.5))
    model = get_peft_model(base, LORA)
    with pytest.raises(ValueError, match="holds a peft adapter: a peft model's save_pretrained writes the adapter only"):
        save_pruned(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save_pruned(merge_lora_preserving_sparsity(model), tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()


def test_verify_sparsity_counts_the_base_model_under_its_own_names():
    """It counted the adapters' dense linears and the head (ignore's "lm_head" did not match base_model.model.lm_head):
    a 2:4 model measured 0.42 and non-conforming."""
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    expected = verify_sparsity(model, "2:4")
    assert verify_sparsity(get_peft_model(model, LORA), "2:4") == expected


def test_a_prompt_tuned_peft_model_is_refused_by_prune_and_save_pruned(tmp_path):
    """Prompt tuning has no tuner layer to refuse: SliceGPT narrowed the hidden states under 64-wide virtual tokens
    (the next forward failed), and save_pruned wrote the adapter's prompt embeddings alone, the pruned weights lost."""
    from peft import PromptTuningConfig, TaskType

    model = get_peft_model(tiny_model(), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for method in ("slicegpt", "wanda"):
        with pytest.raises(ValueError, match=r"the model is a peft PeftModelForCausalLM \(prompt or prefix tuning\).*prune the model before get_peft_model"):
            prune(model, PruningConfig(method=method, sparsity=0.5), calibration=token_windows(4, 16))
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    prune(model.get_base_model(), PruningConfig(method="magnitude", sparsity=0.5))
    with pytest.raises(ValueError, match=r"save_pretrained writes the adapter only.*save_pruned\(model.get_base_model\(\), \.\.\.\)"):
        save_pruned(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save_pruned(model.get_base_model(), tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()
