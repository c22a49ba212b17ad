"""Models accelerate dispatched (a ``device_map`` with ``"disk"`` entries, as a 70B model on one GPU is loaded):
what reads weights reads them through accelerate's hooks, what rewrites or trains them, or moves layers, says so."""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from optimum_prune import (
    PruningCallback,
    PruningConfig,
    SparsityMasks,
    choose_early_exit,
    fold_experts,
    merge_lora_preserving_sparsity,
    prepare_perp,
    prune,
    save_pruned,
    skip_experts,
    skipping_thresholds,
    sparsify,
    verify_sparsity,
)
from optimum_prune.sparsity_metadata import sparsity_config

from .adapters.test_moe import tiny_moe
from .conftest import loaded_with_layer_1_on_disk, tiny_model, token_windows

OFFLOADED = r"^model.layers.1 hold offloaded weights \(meta tensors: a device_map with 'cpu' or 'disk' entries, accelerate's cpu_offload, or weights never loaded, as under init_empty_weights\); "


@pytest.fixture
def pruned_24(tmp_path):
    """A 2:4-pruned tiny Llama, in memory and loaded back with its decoder layer 1 offloaded to disk."""
    model = tiny_model(num_hidden_layers=2)
    prune(model, PruningConfig(method="wanda", sparsity="2:4"), calibration=token_windows())
    save_pruned(model, tmp_path / "pruned")
    return model, loaded_with_layer_1_on_disk(tmp_path / "pruned", tmp_path)


def test_sparsity_is_measured_on_the_weights_the_hooks_load(pruned_24):
    """verify_sparsity and the compressed-tensors metadata read weights with .item() on meta tensors and failed."""
    model, offloaded = pruned_24
    assert verify_sparsity(offloaded, "2:4") == verify_sparsity(model, "2:4")
    assert sparsity_config(offloaded) == sparsity_config(model)


def test_work_that_rewrites_trains_or_moves_offloaded_weights_names_them(pruned_24, tmp_path):
    """Each failed deep inside torch ("Tensor.item() cannot be called on meta tensors", "Cannot copy out of meta
    tensor"), or silently: PERP trained adapters on the meta device that merged nothing back, and the LoRA merge
    skipped the offloaded layers' adapters."""
    _, offloaded = pruned_24
    before = {name: tensor.clone() for name, tensor in offloaded.state_dict().items() if not tensor.is_meta}
    with pytest.raises(ValueError, match=OFFLOADED + "PERP trains the weights' scales and adapters beside them in place, so load"):
        prepare_perp(offloaded)
    with pytest.raises(ValueError, match=OFFLOADED + "sparsify packs each 2:4 weight into its compressed form in memory"):
        sparsify(offloaded)
    with pytest.raises(ValueError, match=OFFLOADED + "SparsityMasks hold each weight's mask in memory"):
        SparsityMasks.from_zeros(offloaded)  # were masks on the meta device: a raw RuntimeError from sparsity()
    with pytest.raises(ValueError, match=OFFLOADED + "choose_early_exit moves one decoder layer at a time to one device"):
        choose_early_exit(offloaded, token_windows(samples=2, seq_len=16), num_samples=2, seq_len=16)
    trainer = Trainer(
        model=offloaded, args=TrainingArguments(tmp_path / "run", max_steps=1, report_to=[], use_cpu=True),
        train_dataset=[{"input_ids": w, "labels": w} for w in token_windows(samples=2, seq_len=16)],
        callbacks=[PruningCallback()],
    )  # fmt: skip
    with pytest.raises(ValueError, match=OFFLOADED + "PruningCallback reads and zeros the weights in place while they train"):
        trainer.train()
    after = {name: tensor for name, tensor in offloaded.state_dict().items() if not tensor.is_meta}
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    with pytest.raises(ValueError, match=r"hold offloaded weights .*merging writes each adapter into its base weight in place"):
        merge_lora_preserving_sparsity(get_peft_model(offloaded, LoraConfig(r=2, target_modules=["q_proj"])))


def test_variants_of_the_mixture_run_under_accelerates_hooks(tmp_path):
    """accelerate's hook is an instance forward on every MoE block: skip_experts / fold_experts took it for another
    variant's patch and refused every dispatched model ("remove() it first"), which had nothing to remove."""
    model = tiny_moe()
    model.save_pretrained(tmp_path / "moe")
    windows = token_windows(samples=2, seq_len=12)
    offloaded = loaded_with_layer_1_on_disk(tmp_path / "moe", tmp_path)
    hooked = dispatch_model(AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval(), device_map={"": "cpu"}, force_hooks=True)
    assert hasattr(hooked.model.layers[0].block_sparse_moe, "_hf_hook")
    with torch.no_grad():
        exact = model(input_ids=windows).logits
        for variant in (lambda m: skip_experts(m, beta=1.0), lambda m: fold_experts(m, measure_error=True)):
            handle = variant(model)
            expected = model(input_ids=windows).logits
            handle.remove()
            assert not torch.equal(expected, exact)  # the variant changes the mixture
            for dispatched in (offloaded, hooked):
                handle = variant(dispatched)
                assert torch.equal(dispatched(input_ids=windows).logits, expected)
                with pytest.raises(ValueError, match="runs .* \\(skip_experts / fold_experts\\)"):
                    save_pruned(dispatched, tmp_path / "refused")
                handle.remove()
                assert torch.equal(dispatched(input_ids=windows).logits, exact)
    with pytest.raises(ValueError, match=OFFLOADED + r"skipping_thresholds moves one decoder layer at a time to one device, so load the model without offloading \(or pass skip_experts a beta\)"):
        skipping_thresholds(offloaded, token_windows(samples=2, seq_len=16), num_samples=2, seq_len=16)
