"""Task-specific expert dropping during fine-tuning: least-routed experts go, the rest reload."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerControl, TrainerState

from optimum_prune.adapters import get_adapter
from optimum_prune.expert_dropping import ExpertDroppingCallback, ExpertDroppingSchedule

from .adapters.test_moe import routed_counts, tiny_moe
from .conftest import token_windows
from .test_distillation import dataset, training_args


def test_schedule_falls_linearly_to_the_final_count():
    schedule = ExpertDroppingSchedule(final_experts=2, start_step=10, end_step=30, every=5)
    assert [schedule.kept_at(step, 8, 30) for step in (0, 10, 20, 30, 40)] == [8, 8, 5, 2, 2]


@pytest.mark.parametrize("through", ["ExpertDroppingCallback", "PruningCallback"])
def test_fine_tuning_drops_to_the_final_count_and_saves_a_smaller_moe(tmp_path, through):
    from optimum_prune import PruningCallback

    model = tiny_moe(num_local_experts=8).train()
    schedule = ExpertDroppingSchedule(final_experts=2, start_step=0, end_step=8, every=4)
    callback = ExpertDroppingCallback(schedule) if through == "ExpertDroppingCallback" else PruningCallback(schedule)
    trainer = Trainer(model=model, args=training_args(tmp_path, 12), train_dataset=dataset(), callbacks=[callback])
    trainer.train()

    assert all(len(layer.block_sparse_moe.experts) == 2 for layer in model.model.layers)
    assert model.config.num_local_experts == 2  # the same count everywhere: a stock config
    assert [entry["experts_kept"] for entry in trainer.state.log_history if "experts_kept" in entry][-1] == 2
    model.eval().save_pretrained(tmp_path / "two-experts")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two-experts").eval()
    ids = token_windows(1, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("dense", [{"mlp_only_layers": [0]}, {"decoder_sparse_step": 2}])
def test_a_qwen_moe_with_dense_layers_saves_a_stock_config_and_reloads(tmp_path, dense):
    """Qwen-MoE configs can make some layers dense: their MLP is no expert block to compare with."""
    model = tiny_moe("qwen2_moe", num_hidden_layers=2, intermediate_size=80, **dense).train()
    assert model.model.layers[0].mlp.__class__.__name__ == "Qwen2MoeMLP"
    callback = ExpertDroppingCallback(ExpertDroppingSchedule(final_experts=2, start_step=0, end_step=2, every=1))
    Trainer(model=model, args=training_args(tmp_path, 3), train_dataset=dataset(), callbacks=[callback]).train()
    assert model.config.num_experts == 2 and not hasattr(model.config, "quantization_config")
    model.eval().save_pretrained(tmp_path / "smaller")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "smaller").eval()
    ids = token_windows(1, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


class CountsAtTheEnd(ExpertDroppingCallback):
    """Records the routing counts each layer holds when training ends."""

    def on_train_end(self, *args, **kwargs):
        self.routed = [int(routing.counts.sum()) for routing in self.layers]
        super().on_train_end(*args, **kwargs)


def test_routing_counts_leave_padding_out(tmp_path):
    from .test_callback import LENGTHS, train_on_padded_batches

    model = tiny_moe(num_local_experts=8).train()
    callback = CountsAtTheEnd(ExpertDroppingSchedule(final_experts=4, start_step=10, end_step=20))
    train_on_padded_batches(model, tmp_path, callback)
    top_k = model.config.num_experts_per_tok
    assert callback.routed == [sum(LENGTHS) * top_k] * model.config.num_hidden_layers


def test_dropped_experts_receive_no_tokens_while_training_goes_on(tmp_path):
    class RoutingAtTheEnd(ExpertDroppingCallback):
        def on_train_end(self, *args, **kwargs):  # counts since the last drop (step 2): steps 3 to 5's tokens
            self.seen = [(routing.counts.clone(), routing.dropped.clone()) for routing in self.layers]
            super().on_train_end(*args, **kwargs)

    model = tiny_moe(num_local_experts=8).train()
    callback = RoutingAtTheEnd(ExpertDroppingSchedule(final_experts=4, start_step=0, end_step=2, every=2))
    trainer = Trainer(model=model, args=training_args(tmp_path, 5), train_dataset=dataset(), callbacks=[callback])
    trainer.train()
    assert len(callback.seen) == model.config.num_hidden_layers
    for counts, dropped in callback.seen:
        assert int(dropped.sum()) == 4 and int(counts[dropped].sum()) == 0 and int(counts[~dropped].sum()) > 0
    assert all(len(layer.block_sparse_moe.experts) == 4 for layer in model.model.layers)
    counts = routed_counts(model.eval(), token_windows(4, 16))
    assert all(int((count > 0).sum()) <= 4 for count in counts)


def test_a_drop_ranks_experts_by_every_token_since_the_previous_drop(tmp_path, monkeypatch):
    """The counts were reset at every scheduled step, also where the schedule dropped nothing: the first drop
    (step 3 here) ranked the experts by step 3's tokens only."""
    from optimum_prune.expert_dropping import _LayerRouting

    seen, drop_to = [], _LayerRouting.drop_to
    monkeypatch.setattr(_LayerRouting, "drop_to", lambda self, keep: (seen.append(int(self.counts.sum())), drop_to(self, keep)))
    model = tiny_moe(num_local_experts=8, num_hidden_layers=1).train()
    callback = ExpertDroppingCallback(ExpertDroppingSchedule(final_experts=6, start_step=0, end_step=8, every=1))
    Trainer(model=model, args=training_args(tmp_path, 4), train_dataset=dataset(), callbacks=[callback]).train()
    step = seen[0]  # tokens × top-k routed in one step (equal-length windows)
    assert seen[:4] == [step, 2 * step, 3 * step, step]  # kept 8, 8, then 7 at step 3, then counting anew


def test_ignore_keeps_an_moe_blocks_experts(tmp_path):
    """PruningCallback(ignore=...) masked nothing there, yet its expert dropping dropped that block's experts."""
    from optimum_prune import PruningCallback

    model = tiny_moe(num_local_experts=8).train()
    schedule = ExpertDroppingSchedule(final_experts=2, start_step=0, end_step=4, every=2)
    callback = PruningCallback(schedule, ignore=["model.layers.0.block_sparse_moe*"])
    Trainer(model=model, args=training_args(tmp_path, 5), train_dataset=dataset(), callbacks=[callback]).train()
    assert [len(layer.block_sparse_moe.experts) for layer in model.model.layers] == [8, 2]
    with pytest.raises(ValueError, match=r"ExpertDroppingCallback ignore \['\*.experts.\*'\] keeps every MoE block"):
        every = ExpertDroppingCallback(schedule, ignore=["*.experts.*"])
        Trainer(model=tiny_moe().train(), args=training_args(tmp_path, 2), train_dataset=dataset(), callbacks=[every]).train()


def test_an_end_step_past_the_run_is_reported(tmp_path, caplog):
    schedule = ExpertDroppingSchedule(final_experts=2, end_step=8, every=2)
    trainer = Trainer(model=tiny_moe(num_local_experts=8), args=training_args(tmp_path, 4), train_dataset=dataset(),
                      callbacks=[ExpertDroppingCallback(schedule)])  # fmt: skip
    with caplog.at_level("WARNING", logger="optimum_prune.expert_dropping"):
        trainer.train()
    assert "end_step (8) is past the run's 4 steps: it ends at 5 experts per layer, not final_experts=2" in caplog.text


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="end_step"):
        ExpertDroppingSchedule(start_step=10, end_step=5)
    model = tiny_moe()
    callback = ExpertDroppingCallback(ExpertDroppingSchedule(final_experts=1))
    with pytest.raises(ValueError, match="below the router's top-2"):
        Trainer(model=model, args=training_args(tmp_path, 2), train_dataset=dataset(), callbacks=[callback]).train()


@pytest.mark.parametrize("through", ["ExpertDroppingCallback", "PruningCallback"])
def test_a_run_resumed_from_a_checkpoint_routes_around_the_experts_dropped_before(tmp_path, through, caplog):
    """The dropped experts were not in the checkpoint: a resumed run routed to all again and, with no drop
    left after the resume, kept every expert."""
    from optimum_prune import PruningCallback

    schedule = ExpertDroppingSchedule(final_experts=2, start_step=0, end_step=4, every=4)
    runs = {}
    for name, resume in (("uninterrupted", None), ("resumed", str(tmp_path / "run" / "checkpoint-5"))):
        model = tiny_moe(num_local_experts=8).train()
        callback = ExpertDroppingCallback(schedule) if through == "ExpertDroppingCallback" else PruningCallback(schedule)
        args = training_args(tmp_path, 7)
        args.save_strategy, args.save_steps = "steps", 5
        with caplog.at_level("WARNING", logger="optimum_prune.expert_dropping"):
            Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[callback]).train(resume_from_checkpoint=resume)
        runs[name] = model
    assert [len(layer.block_sparse_moe.experts) for layer in runs["resumed"].model.layers] == [2, 2]
    for expected, actual in zip(runs["uninterrupted"].model.layers, runs["resumed"].model.layers):
        # the same experts kept (MoE training itself resumes only to ~5e-4 here; other experts differ by far more)
        torch.testing.assert_close(actual.block_sparse_moe.gate.weight, expected.block_sparse_moe.gate.weight, atol=5e-3, rtol=0)
    assert "between two expert drops" not in caplog.text  # no drop is left after step 4


def test_a_best_checkpoint_evaluated_before_the_last_drop_is_reported(tmp_path, caplog):
    model = tiny_moe(num_local_experts=8).train()
    args = training_args(tmp_path, 4)
    args.eval_strategy = args.save_strategy = "steps"
    args.eval_steps = args.save_steps = 1
    args.load_best_model_at_end, args.metric_for_best_model, args.greater_is_better = True, "eval_loss", True  # step 1 wins
    schedule = ExpertDroppingSchedule(final_experts=2, start_step=0, end_step=4, every=2)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), eval_dataset=dataset(samples=4), callbacks=[ExpertDroppingCallback(schedule)])
    with caplog.at_level("WARNING", logger="optimum_prune.expert_dropping"):
        trainer.train()
    assert f"loaded the checkpoint of step {trainer.state.best_global_step}, evaluated with" in caplog.text


def test_routing_hooks_of_a_run_stopped_by_an_exception_are_removed_when_the_next_run_starts(tmp_path):
    """The stopped run's hooks kept routing around the experts it had dropped, beside the next run's."""
    from transformers import TrainerCallback

    class StopAtStep5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise KeyboardInterrupt

    model = tiny_moe(num_local_experts=8).train()
    callback = ExpertDroppingCallback(ExpertDroppingSchedule(final_experts=2, start_step=0, end_step=8, every=4))
    with pytest.raises(KeyboardInterrupt):
        Trainer(model=model, args=training_args(tmp_path, 12), train_dataset=dataset(), callbacks=[callback, StopAtStep5()]).train()
    assert any(len(layer.block_sparse_moe.gate._forward_hooks) for layer in model.model.layers)
    callback.on_train_begin(training_args(tmp_path, 12), TrainerState(max_steps=12), TrainerControl(), model=model)
    assert all(len(layer.block_sparse_moe.gate._forward_hooks) == 1 for layer in model.model.layers)
    callback.on_train_end(training_args(tmp_path, 12), TrainerState(max_steps=12), TrainerControl())
    assert not any(len(layer.block_sparse_moe.gate._forward_hooks) for layer in model.model.layers)
    assert all(len(layer.block_sparse_moe.experts) == 8 for layer in model.model.layers)  # the new run dropped none


def test_a_drop_removes_the_least_routed_experts():
    from optimum_prune.expert_dropping import _LayerRouting
    from optimum_prune.training_hooks import RealTokens

    model = tiny_moe(num_local_experts=8, num_hidden_layers=1)
    adapter = get_adapter(model)
    routing = _LayerRouting(adapter, adapter.decoder_layers()[0], RealTokens(model))
    routing.counts = torch.tensor([5, 90, 0, 40, 7, 60, 3, 80])
    routing.drop_to(4)
    assert routing.dropped.nonzero().flatten().tolist() == [0, 2, 4, 6]
    routing.counts = torch.tensor([0, 50, 0, 10, 0, 70, 0, 30])
    routing.drop_to(2)
    assert (~routing.dropped).nonzero().flatten().tolist() == [1, 5]


def test_evaluation_tokens_do_not_count_towards_a_drop(tmp_path):
    model = tiny_moe(num_local_experts=8).train()
    args = training_args(tmp_path, 2)
    args.eval_strategy, args.eval_steps = "steps", 1
    callback = CountsAtTheEnd(ExpertDroppingSchedule(final_experts=4, start_step=10, end_step=20))
    Trainer(model=model, args=args, train_dataset=dataset(), eval_dataset=dataset(samples=4), callbacks=[callback]).train()
    top_k = model.config.num_experts_per_tok
    assert callback.routed == [2 * 4 * 16 * top_k] * model.config.num_hidden_layers  # two training batches of 4 × 16 tokens


def test_the_last_drop_happens_at_end_step_between_scheduled_steps(tmp_path):
    model = tiny_moe(num_local_experts=8).train()
    callback = ExpertDroppingCallback(ExpertDroppingSchedule(final_experts=2, start_step=0, end_step=5, every=4))
    Trainer(model=model, args=training_args(tmp_path, 5), train_dataset=dataset(), callbacks=[callback]).train()
    assert [len(layer.block_sparse_moe.experts) for layer in model.model.layers] == [2, 2]


def test_without_end_step_the_drops_end_half_way_through_the_run(tmp_path):
    model = tiny_moe(num_local_experts=8).train()
    callback = ExpertDroppingCallback(ExpertDroppingSchedule(final_experts=2, every=1))
    trainer = Trainer(model=model, args=training_args(tmp_path, 4), train_dataset=dataset(), callbacks=[callback])
    trainer.train()
    kept = {entry["step"]: entry["experts_kept"] for entry in trainer.state.log_history if "experts_kept" in entry}
    assert kept[2] == 2  # end_step defaults to max_steps // 2


def test_without_end_step_a_late_start_still_drops_to_the_final_count(tmp_path):
    """end_step defaults to max(start_step + 1, max_steps // 2): a start past half the run ends one step after it."""
    model = tiny_moe(num_local_experts=8).train()
    callback = ExpertDroppingCallback(ExpertDroppingSchedule(final_experts=2, start_step=3, every=1))
    Trainer(model=model, args=training_args(tmp_path, 4), train_dataset=dataset(), callbacks=[callback]).train()
    assert [len(layer.block_sparse_moe.experts) for layer in model.model.layers] == [2, 2]


def test_an_end_step_at_the_last_step_is_not_reported_as_past_the_run(tmp_path, caplog):
    schedule = ExpertDroppingSchedule(final_experts=2, end_step=4, every=2)
    model = tiny_moe(num_local_experts=8).train()
    trainer = Trainer(model=model, args=training_args(tmp_path, 4), train_dataset=dataset(), callbacks=[ExpertDroppingCallback(schedule)])
    with caplog.at_level("WARNING", logger="optimum_prune.expert_dropping"):
        trainer.train()
    assert "past the run" not in caplog.text
    assert [len(layer.block_sparse_moe.experts) for layer in model.model.layers] == [2, 2]


def test_resuming_after_the_drops_from_a_checkpoint_that_does_not_record_them_is_refused(tmp_path):
    args = training_args(tmp_path, 2)
    args.save_strategy, args.save_steps = "steps", 2
    Trainer(model=tiny_moe(num_local_experts=8).train(), args=args, train_dataset=dataset()).train()  # saved without the callback
    schedule = ExpertDroppingSchedule(final_experts=2, start_step=0, end_step=2, every=1)
    model = tiny_moe(num_local_experts=8).train()
    trainer = Trainer(model=model, args=training_args(tmp_path, 4), train_dataset=dataset(), callbacks=[ExpertDroppingCallback(schedule)])
    with pytest.raises(ValueError, match="does not record which experts were dropped"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))



def test_final_experts_not_below_the_models_count_is_refused(tmp_path):
    """final_experts=6 on a 4-expert model dropped nothing, without a word (kept_at even rose above the count)."""
    callback = ExpertDroppingCallback(ExpertDroppingSchedule(final_experts=4, start_step=0, end_step=4, every=2))
    with pytest.raises(ValueError, match=r"final_experts \(4\) is not below the model's 4 experts per layer: keep fewer, between 2 and 3"):
        Trainer(model=tiny_moe().train(), args=training_args(tmp_path, 6), train_dataset=dataset(), callbacks=[callback]).train()


def test_a_token_with_nan_router_logits_counts_for_no_expert():
    """One overflowing training forward sent all its tokens to experts 5 and 6 (NaN logits' top-k), which then stayed."""
    from optimum_prune.expert_dropping import _LayerRouting
    from optimum_prune.training_hooks import RealTokens

    model = tiny_moe(num_local_experts=8, num_hidden_layers=1).train()
    adapter = get_adapter(model)
    routing = _LayerRouting(adapter, adapter.decoder_layers()[0], RealTokens(model))
    vocab = model.config.vocab_size
    with torch.no_grad():
        model(input_ids=token_windows(samples=2, seq_len=16, seed=1, vocab=vocab))
        clean = routing.counts.tolist()
        weight = model.model.layers[0].post_attention_layernorm.weight
        saved = weight.clone()
        weight[:] = float("nan")
        model(input_ids=token_windows(samples=2, seq_len=16, seed=2, vocab=vocab))
        weight.copy_(saved)
    assert routing.counts.tolist() == clean and sum(clean) == 2 * 16 * 2


@pytest.mark.parametrize("through", ["ExpertDroppingCallback", "PruningCallback"])
def test_a_callback_kept_after_training_frees_the_model(tmp_path, through):
    """Its adapter held the model: a sweep keeping one callback per run kept every run's model alive."""
    import gc
    import weakref

    from optimum_prune import PruningCallback

    model = tiny_moe(num_local_experts=4).train()
    alive = weakref.ref(model)
    schedule = ExpertDroppingSchedule(final_experts=2, start_step=0, end_step=2, every=1)
    callback = ExpertDroppingCallback(schedule) if through == "ExpertDroppingCallback" else PruningCallback(schedule)
    Trainer(model=model, args=training_args(tmp_path, 3), train_dataset=dataset(), callbacks=[callback]).train()
    del model
    gc.collect()
    assert alive() is None
