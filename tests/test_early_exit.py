"""Early exit for self-speculative decoding: exit-layer measurements, identical greedy output, save/reload."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_prune import PruningConfig, prune
from optimum_prune.adapters import get_adapter
from optimum_prune.early_exit import (
    EarlyExitReport, ExitLayer, _best_draft, choose_early_exit, draft_costs, early_exit_kwargs, enable_early_exit, exit_logits,
)  # fmt: skip

from .adapters.test_moe import tiny_moe
from .conftest import tiny_model, token_windows


def test_report_measures_every_candidate_layer():
    model = tiny_model(num_hidden_layers=4)
    report = choose_early_exit(model, token_windows(samples=3, seq_len=16), num_samples=3, seq_len=16)
    assert [c.layer for c in report.candidates] == [1, 2, 3]
    assert all(0.0 <= c.agreement <= 1.0 and c.expected_speedup > 0 for c in report.candidates)
    influence = [c.remaining_influence for c in report.candidates]
    assert influence == sorted(influence, reverse=True)  # fewer layers skipped, less influence left
    assert model.config.num_hidden_layers == 4  # the model is left as it was
    assert "best: exit after layer" in str(report)


def test_agreement_is_the_teacher_forced_match_of_greedy_tokens():
    model = tiny_model(num_hidden_layers=4)
    windows = token_windows(samples=3, seq_len=16)
    report = choose_early_exit(model, windows, num_samples=3, seq_len=16)
    layers = model.model.layers
    with torch.no_grad():
        full = model(input_ids=windows).logits.argmax(-1)
        for candidate in report.candidates:
            model.model.layers = layers[: candidate.layer]  # the draft: the first k layers, then norm and LM head
            draft = model(input_ids=windows).logits.argmax(-1)
            assert candidate.agreement == float((draft == full).double().mean())
    assert len({c.agreement for c in report.candidates}) > 1  # the candidates are told apart


@pytest.mark.parametrize("speedup", [0.8, 1.5])
def test_report_says_when_no_exit_pays(speedup):
    report = EarlyExitReport(4, [ExitLayer(2, agreement=0.5, draft_cost=0.5, draft_length=2, expected_speedup=speedup, remaining_influence=0.1)])
    assert ("leave early exit off" in str(report)) == (speedup < 1)


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite"])  # Gemma 2 soft-caps its logits, Granite scales them
def test_exit_logits_are_what_the_early_exit_draft_computes(family):
    model = tiny_model(family, num_hidden_layers=4)
    ids = token_windows(samples=2, seq_len=8)
    with torch.no_grad():
        read_at_exit = exit_logits(model, model(input_ids=ids, output_hidden_states=True).hidden_states[2])
        model.config.num_hidden_layers = 2  # transformers' early-exit draft: the first two layers
        draft = model(input_ids=ids).logits
    torch.testing.assert_close(read_at_exit, draft)


def test_speedup_formula_matches_leviathan_et_al():
    # α = 0.8, c = 0.25, γ = 3: (1 − 0.8⁴) / ((1 − 0.8)(3·0.25 + 1)) = 0.5904 / 0.35
    gamma, speedup = _best_draft(0.8, 0.25, max_draft=3)
    assert gamma == 3 and speedup == pytest.approx(0.5904 / 0.35)
    assert _best_draft(0.0, 0.5, max_draft=5) == (1, pytest.approx(1 / 1.5))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("exit_layer", [1, 2])
def test_greedy_output_equals_the_full_model_on_a_pruned_model_and_survives_reload(exit_layer, family, tmp_path):
    model = tiny_model(family, num_hidden_layers=3)
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    prompt = token_windows(samples=1, seq_len=6, seed=4)
    plain = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    enable_early_exit(model, exit_layer, draft_length=4)
    assert early_exit_kwargs(model) == {"assistant_early_exit": exit_layer}
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, **early_exit_kwargs(model)), plain)
    model.save_pretrained(tmp_path / "exit")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "exit")
    assert early_exit_kwargs(reloaded) == early_exit_kwargs(model)
    assert reloaded.generation_config.num_assistant_tokens == 4
    generated = reloaded.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, **early_exit_kwargs(reloaded))
    assert torch.equal(generated, plain)


def test_draft_cost_counts_the_lm_head():
    model = tiny_model(num_hidden_layers=4)
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    head_bytes = model.lm_head.weight.numel() * 4
    assert draft_costs(model)[1] == pytest.approx((layer_bytes + head_bytes) / (4 * layer_bytes + head_bytes))
    assert draft_costs(model)[1] > 1 / 4 and draft_costs(model)[4] == 1.0
    report = choose_early_exit(model, token_windows(samples=2, seq_len=8), candidates=[1], num_samples=2, seq_len=8)
    assert report.candidates[0].draft_cost == draft_costs(model)[1]


def test_draft_cost_reads_the_routed_experts_only():
    model = tiny_moe("mixtral")  # 4 experts, top-2, 2 layers
    block = model.model.layers[0].block_sparse_moe
    experts_bytes = sum(p.numel() * 4 for p in block.experts.parameters())
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters()) - experts_bytes / 2
    head_bytes = model.lm_head.weight.numel() * 4
    assert draft_costs(model)[1] == pytest.approx((layer_bytes + head_bytes) / (2 * layer_bytes + head_bytes))


def test_an_moe_model_gets_a_report_and_exit_logits():
    """The MoE adapter had no final norm: choosing an exit on Mixtral failed with a structured-pruning error."""
    model = tiny_moe("mixtral", num_hidden_layers=3)
    report = choose_early_exit(model, token_windows(samples=2, seq_len=16))
    assert [candidate.layer for candidate in report.candidates] == [1, 2]
    assert all(0 <= candidate.agreement <= 1 for candidate in report.candidates)


@contextmanager
def pass_counts(model):
    """Forward passes of the first and last decoder layers: drafts run only the first, full passes both."""
    counts = {"first": 0, "last": 0}
    layers = get_adapter(model).decoder_layers()
    hooks = [
        layers[index].register_forward_hook(lambda *_, key=key: counts.__setitem__(key, counts[key] + 1))
        for index, key in ((0, "first"), (-1, "last"))
    ]
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("draft_length", [1, 3])
def test_generate_drafts_at_most_the_chosen_length(draft_length):
    model = tiny_model(num_hidden_layers=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(200)  # a confident draft: transformers stops a draft below 0.4 probability
    prompt = token_windows(samples=1, seq_len=6, seed=4)
    with pass_counts(model) as default:
        model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0, assistant_early_exit=1)
    assert default["first"] - default["last"] > 4 * default["last"]  # transformers' default drafts up to 20 tokens
    enable_early_exit(model, 1, draft_length)
    with pass_counts(model) as chosen:
        model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0, **early_exit_kwargs(model))
    assert 0 < chosen["first"] - chosen["last"] <= draft_length * chosen["last"]


def test_a_lost_draft_length_is_reported(caplog):
    model = tiny_model(num_hidden_layers=3)
    enable_early_exit(model, 2, draft_length=3)
    model.generation_config.num_assistant_tokens = 20  # e.g. a generation_config.json from elsewhere
    with caplog.at_level("WARNING", logger="optimum_prune.early_exit"):
        assert early_exit_kwargs(model) == {"assistant_early_exit": 2}
    assert "enable_early_exit(model, 2, 3)" in caplog.text


@pytest.mark.parametrize("layer", [0, 3, 7, 1.5])
def test_exit_layer_outside_the_model_is_refused(layer):
    with pytest.raises(ValueError, match=r"must be an integer in \[1, 2\]"):
        enable_early_exit(tiny_model(num_hidden_layers=3), layer)


def test_a_sliced_model_is_refused():
    """After SliceGPT every residual point has its own basis; the final norm and head read the last one's, so
    an exit read the stream in the wrong basis (tied embeddings: a shape error; untied: meaningless agreements)."""
    model = tiny_model(num_hidden_layers=4)
    prune(model, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    message = "model.layers.0 was sliced by SliceGPT, which gives every layer's stream its own basis; an early exit reads"
    with pytest.raises(ValueError, match=message):
        choose_early_exit(model, token_windows(samples=2, seq_len=16))
    with pytest.raises(ValueError, match=message):
        enable_early_exit(model, 2, 3)


@pytest.mark.parametrize("family, stops", [("mixtral", True), ("qwen3_moe", True), ("qwen2_moe", False)])
def test_a_model_whose_forward_ignores_the_drafts_layer_count_is_refused(family, stops):
    """Qwen2-MoE's forward (transformers 4.57) runs every layer whatever config.num_hidden_layers says: its draft was the whole model."""
    model = tiny_moe(family, num_hidden_layers=3)
    if stops:
        enable_early_exit(model, 1)
        assert model.config.num_hidden_layers == 3
    else:
        with pytest.raises(ValueError, match="Qwen2MoeForCausalLM runs all its decoder layers whatever config.num_hidden_layers"):
            enable_early_exit(model, 1)
        assert model.config.num_hidden_layers == 3 and not getattr(model.config, "early_exit", None)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_models_transformers_cannot_draft_from_are_refused(family):
    """transformers finds the model to shorten as getattr(model, model.base_model_prefix): LLaVA's prefix is empty and
    Gemma3ForCausalLM's ('language_model') names no attribute, so generate failed after the exit was accepted."""
    from .multimodal.conftest import tiny_llava

    model = tiny_llava(image_token_id=5) if family == "llava" else tiny_model("gemma3")
    with pytest.raises(ValueError, match=f"{type(model).__name__} does not have .*generate would fail"):
        enable_early_exit(model, 1)


def test_a_lora_wrapped_model_is_probed_as_the_model_it_wraps():
    """The probe remembered classes that passed by type(model): every LoRA wrapper is a PeftModel, so one wrapped
    Llama let a wrapped Qwen2-MoE through."""
    from peft import LoraConfig, get_peft_model

    enable_early_exit(get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"])), 1)
    wrapped = get_peft_model(tiny_moe("qwen2_moe"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Qwen2MoeForCausalLM runs all its decoder layers"):
        enable_early_exit(wrapped, 1)


def test_influence_left_is_the_sum_over_the_layers_the_draft_skips():
    model = tiny_model(num_hidden_layers=4)
    windows = token_windows(samples=3, seq_len=16)
    report = choose_early_exit(model, windows, num_samples=3, seq_len=16)
    pairs = []
    handles = [
        layer.register_forward_hook(lambda _m, args, kwargs, out: pairs.append((args[0] if args else kwargs["hidden_states"], out[0] if isinstance(out, tuple) else out)), with_kwargs=True)
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(input_ids=windows)
    for handle in handles:
        handle.remove()
    influence = [1 - float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean()) for a, b in pairs]
    for candidate in report.candidates:
        assert candidate.remaining_influence == pytest.approx(sum(influence[candidate.layer :]), rel=1e-4)


def test_best_is_the_candidate_with_the_highest_expected_speedup():
    report = EarlyExitReport(4, [
        ExitLayer(1, 0.5, 0.3, 2, 1.2, 0.5), ExitLayer(2, 0.8, 0.5, 3, 1.6, 0.2), ExitLayer(3, 0.9, 0.8, 2, 1.1, 0.1),
    ])  # fmt: skip
    assert report.best.layer == 2 and "best: exit after layer 2 of 4 (γ=3, ×1.60 expected)" in str(report)


def test_each_candidates_speedup_is_computed_from_its_own_cost():
    model = tiny_model(num_hidden_layers=4)
    report = choose_early_exit(model, token_windows(samples=2, seq_len=16), num_samples=2, seq_len=16, max_draft=4)
    for c in report.candidates:
        assert (c.draft_length, c.expected_speedup) == _best_draft(c.agreement, c.draft_cost, 4)
        assert c.draft_cost == draft_costs(model)[c.layer]


def test_full_agreement_drafts_the_longest_and_gains_gamma_plus_one_tokens():
    assert _best_draft(1.0, 0.25, max_draft=3) == (3, pytest.approx(4 / 1.75))


def test_draft_cost_reads_top_k_of_many_experts():
    model = tiny_moe("mixtral", num_local_experts=8, num_experts_per_tok=2)
    block = model.model.layers[0].block_sparse_moe
    experts_bytes = sum(p.numel() * 4 for p in block.experts.parameters())
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters()) - experts_bytes * 6 / 8
    head_bytes = model.lm_head.weight.numel() * 4
    assert draft_costs(model)[1] == pytest.approx((layer_bytes + head_bytes) / (2 * layer_bytes + head_bytes))


def test_draft_cost_counts_weights_stored_as_buffers():
    model = tiny_model(num_hidden_layers=2)
    for layer in model.model.layers:
        layer.register_buffer("packed", torch.zeros(100_000, dtype=torch.int8))
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters()) + 100_000
    head_bytes = model.lm_head.weight.numel() * 4
    assert draft_costs(model)[1] == pytest.approx((layer_bytes + head_bytes) / (2 * layer_bytes + head_bytes))


def test_a_speedup_of_exactly_one_says_leave_it_off():
    report = EarlyExitReport(4, [ExitLayer(2, 0.0, 0.0, 1, 1.0, 0.1)])
    assert "leave early exit off" in str(report)


@pytest.mark.parametrize("draft_length", [0, True])
def test_a_draft_length_below_one_is_refused(draft_length):
    with pytest.raises(ValueError, match="draft_length must be a positive number of tokens"):
        enable_early_exit(tiny_model(num_hidden_layers=3), 1, draft_length)


def test_the_draft_length_is_made_constant_over_a_heuristic_schedule():
    model = tiny_model(num_hidden_layers=3)
    model.generation_config.num_assistant_tokens_schedule = "heuristic"
    enable_early_exit(model, 1, 3)
    assert model.generation_config.num_assistant_tokens_schedule == "constant"


def test_a_boolean_exit_layer_is_refused():
    with pytest.raises(ValueError, match=r"must be an integer in \[1, 2\]"):
        enable_early_exit(tiny_model(num_hidden_layers=3), True)


def test_choosing_an_exit_keeps_the_models_mode():
    model = tiny_model(num_hidden_layers=3)
    choose_early_exit(model, token_windows(samples=2, seq_len=16), num_samples=2, seq_len=16)
    assert not model.training


def test_candidates_are_measured_once_each_in_order():
    model = tiny_model(num_hidden_layers=4)
    report = choose_early_exit(model, token_windows(samples=2, seq_len=16), candidates=[3, 1, 3], num_samples=2, seq_len=16)
    assert [c.layer for c in report.candidates] == [1, 3]


def test_a_recorded_exit_the_model_no_longer_has_is_refused():
    model = tiny_model(num_hidden_layers=3)
    enable_early_exit(model, 2)
    model.config.early_exit = {"exit_layer": 3, "draft_length": None}  # e.g. a config edited or from a deeper model
    with pytest.raises(ValueError, match=r"must be an integer in \[1, 2\]"):
        early_exit_kwargs(model)


@pytest.mark.parametrize("removed, exit_layer", [([0], 1), ([3], 2), ([1, 2], 1), ([0, 1], None), ([2, 3], None)])
def test_a_recorded_exit_follows_its_layer_when_layers_are_removed(removed, exit_layer, caplog):
    """Exit after layer 2 of 4 recorded, then layers removed: the draft kept running the first 2 layers of the
    pruned model, other layers than the exit was chosen or trained for. It now ends where it ended in the model
    (after the kept layers among the first 2), or is dropped with a warning where none of those is left or none
    after them."""
    model = tiny_model(num_hidden_layers=4)
    enable_early_exit(model, 2, draft_length=4)
    kept = "".join(str(i) for i in range(4) if i not in removed)
    config = PruningConfig(method="layers", sparsity=0.0, ignore=[f"model.layers.[{kept}]"], method_options={"num_layers": len(removed)})
    prune(model, config, calibration=token_windows())
    assert early_exit_kwargs(model) == ({} if exit_layer is None else {"assistant_early_exit": exit_layer})
    assert ("config.early_exit drafted with the first 2 decoder layers" in caplog.text) == (exit_layer is None)
