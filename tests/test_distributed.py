"""Multi-process calibration: two gloo processes prune exactly as one process on the same windows."""

from __future__ import annotations

import os

import pytest
import torch
from torch import distributed as dist
from torch import multiprocessing

from optimum_prune import PruningConfig, prune
from optimum_prune.adapters import get_adapter
from optimum_prune.allocation.sensitivity import SensitivityAllocation, SensitivityOptions
from optimum_prune.distributed import rank_zero_first, shard

from .adapters.test_moe import tiny_moe
from .conftest import tiny_model, token_windows

MODELS = {  # (the model, the length of its 8 calibration windows)
    "llama": (lambda: tiny_model(num_hidden_layers=2), 32),
    # OWL over 2 layers depends only on which has more outliers: 4 show whether every process's norms were summed
    "llama, 4 layers": (lambda: tiny_model(num_hidden_layers=4), 32),
    # top-1 routing of 32 tokens over 16 experts: some expert gets tokens on one process only, and is routed
    "mixtral, top-1 of 16 experts": (lambda: tiny_moe(num_local_experts=16, num_experts_per_tok=1), 4),
}
CASES = {
    "wanda": ("llama", dict(method="wanda", sparsity=0.5)),
    "sparsegpt 2:4": ("llama", dict(method="sparsegpt", sparsity="2:4")),
    "wanda owl": ("llama, 4 layers", dict(method="wanda", sparsity=0.6, allocation="owl")),
    "wanda sensitivity": ("llama", dict(method="wanda", sparsity=0.5, allocation="sensitivity", allocation_options={"windows": 3})),
    "magnitude (no calibration to share)": ("llama", dict(method="magnitude", sparsity=0.5)),
    "wanda, experts routed on one process": ("mixtral, top-1 of 16 experts", dict(method="wanda", sparsity=0.5, moe_options={"unrouted_experts": "dense"})),
}


def _pruned_state(model_name: str, config: dict) -> dict[str, torch.Tensor]:
    build, seq_len = MODELS[model_name]
    model = build()
    report = prune(model, PruningConfig(**config), calibration=token_windows(samples=8, seq_len=seq_len))
    return {**model.state_dict(), "calibration_tokens": torch.tensor(report.calibration_tokens)}


def _worker(rank: int, world: int, init_file: str, case: str, output: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = _pruned_state(*CASES[case])
        if rank == 0:
            torch.save(state, output)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", CASES)
def test_two_gloo_processes_prune_like_one(case, tmp_path):
    output = tmp_path / "rank0.pt"
    multiprocessing.spawn(_worker, args=(2, str(tmp_path / "init"), case, str(output)), nprocs=2, join=True)
    together, alone = torch.load(output), _pruned_state(*CASES[case])
    assert together["calibration_tokens"] == alone["calibration_tokens"]  # the report counts every process's windows
    for name, weight in alone.items():
        assert torch.equal(together[name] == 0, weight == 0), name  # identical masks
        torch.testing.assert_close(together[name], weight, rtol=1e-4, atol=1e-6)  # sums differ only in order


def _sensitivities(windows: torch.Tensor) -> torch.Tensor:
    """Per-layer Hessian traces of allocation 'sensitivity' over the first 3 of the windows."""
    model = tiny_model(num_hidden_layers=4)
    allocation = SensitivityAllocation(SensitivityOptions(windows=3))
    allocation.observe_model(model, windows, get_adapter(model).qualified_prunable_linears())
    return torch.tensor(allocation.sensitivities)


def _estimate_sensitivities(rank: int, world: int, init_file: str, output: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sensitivities = _sensitivities(shard(token_windows(samples=8)))
        if rank == 0:
            torch.save(sensitivities, output)
    finally:
        dist.destroy_process_group()


def test_two_processes_estimate_the_sensitivities_of_one_on_the_same_windows(tmp_path):
    """Each process takes its share of the first `windows` windows of the whole set (not of its shard), with
    the probes a single process draws for them, and the means are weighted by the windows each used."""
    output = tmp_path / "rank0.pt"
    multiprocessing.spawn(_estimate_sensitivities, args=(2, str(tmp_path / "init"), str(output)), nprocs=2, join=True)
    torch.testing.assert_close(torch.load(output), _sensitivities(token_windows(samples=8)), rtol=1e-6, atol=0)


def _first_rank_prepares(rank: int, world: int, init_file: str, log: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rank_zero_first(lambda: open(log, "a").write(f"prepared by {rank}\n"))
        with open(log, "a") as handle:  # every process goes on only once the first has prepared
            handle.write(f"{rank} after\n")
    finally:
        dist.destroy_process_group()


def test_rank_zero_first_prepares_once_before_the_others_go_on(tmp_path):
    log = tmp_path / "log"
    multiprocessing.spawn(_first_rank_prepares, args=(2, str(tmp_path / "init"), str(log)), nprocs=2, join=True)
    lines = log.read_text().splitlines()
    assert lines[0] == "prepared by 0" and sorted(lines[1:]) == ["0 after", "1 after"]


def _train_time_decisions(windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The masks of a Wanda-scored gradual pruning step and the experts dropped by ExpertDroppingCallback,
    after one training step over ``windows`` (Trainer events driven by hand)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from optimum_prune import ExpertDroppingSchedule, GradualSchedule, PruningCallback

    from .adapters.test_moe import tiny_moe

    args, control = TrainingArguments("unused", report_to=[]), TrainerControl()
    decisions = {}
    for name, model, callback in (
        ("wanda", tiny_model(num_hidden_layers=1), PruningCallback(GradualSchedule(0.5, end_step=1, every=1, score="wanda"))),
        ("experts", tiny_moe(), PruningCallback(ExpertDroppingSchedule(final_experts=2, end_step=1))),
    ):
        state = TrainerState(max_steps=2)
        callback.on_train_begin(args, state, control, model=model)
        model.train()
        with torch.no_grad():
            for ids in windows:
                model(ids)
        state.global_step = 1
        callback.on_step_end(args, state, control, model=model)
        if name == "wanda":
            decisions[name] = torch.cat([mask.flatten() for mask in callback.masks.pruned.values()])
        else:
            decisions[name] = torch.cat([routing.dropped for routing in callback.expert_dropping.layers])
    return decisions


def _decide_at_train_time(rank: int, world: int, init_file: str, output: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_train_time_decisions([token_windows(2, 16, seed=rank)]), f"{output}.{rank}")
    finally:
        dist.destroy_process_group()


def test_train_time_pruning_and_expert_dropping_decide_alike_in_every_process(tmp_path):
    """Under DDP each process sees its own batches: Wanda norms and expert counts are summed over all."""
    output = str(tmp_path / "decisions")
    multiprocessing.spawn(_decide_at_train_time, args=(2, str(tmp_path / "init"), output), nprocs=2, join=True)
    ranks = [torch.load(f"{output}.{rank}") for rank in range(2)]
    alone = _train_time_decisions([token_windows(2, 16, seed=rank) for rank in range(2)])
    for name in alone:
        assert torch.equal(ranks[0][name], ranks[1][name]) and torch.equal(ranks[0][name], alone[name]), name


def test_shard_splits_windows_round_robin_and_needs_one_per_process(monkeypatch):
    windows = torch.arange(10).reshape(5, 2)
    monkeypatch.setattr("optimum_prune.distributed.world", lambda: (1, 2))
    monkeypatch.setattr("optimum_prune.distributed._check_same_everywhere", lambda inputs: None)  # no process group here
    assert torch.equal(shard(windows), windows[1::2])
    batch = {"input_ids": windows, "attention_mask": torch.ones_like(windows)}
    assert [sample["input_ids"].tolist() for sample in shard([batch])] == [[[2, 3]], [[6, 7]]]  # one batch, per sample
    monkeypatch.setattr("optimum_prune.distributed.world", lambda: (0, 8))
    with pytest.raises(ValueError, match=r"the calibration holds 5 window\(s\) for 8 processes"):
        shard(windows)


def _prune_on(rank: int, world: int, init_file: str, output: str, calibration: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_model(num_hidden_layers=2)
        windows = {  # a tokenizer's one batch of 8 samples; each process its own windows
            "one batch": {"input_ids": token_windows(8, 32)},
            "each its own": token_windows(4, 32, seed=10 + rank),
        }[calibration]
        try:
            prune(model, PruningConfig(method="wanda", sparsity=0.5), calibration=windows)
        except ValueError as error:
            torch.save(str(error), f"{output}.{rank}")
            return
        torch.save(model.state_dict(), f"{output}.{rank}")
    finally:
        dist.destroy_process_group()


def test_one_tokenizer_batch_is_shared_out_per_sample(tmp_path):
    """It was refused: "num_calibration_samples (1) is smaller than the 2 processes" (the batch held 8 samples)."""
    output = str(tmp_path / "pruned")
    multiprocessing.spawn(_prune_on, args=(2, str(tmp_path / "init"), output, "one batch"), nprocs=2, join=True)
    alone = tiny_model(num_hidden_layers=2)
    prune(alone, PruningConfig(method="wanda", sparsity=0.5), calibration={"input_ids": token_windows(8, 32)})
    together = torch.load(f"{output}.0")
    for name, weight in alone.state_dict().items():
        assert torch.equal(together[name] == 0, weight == 0), name


def test_processes_given_different_calibration_are_refused(tmp_path):
    """Each keeps only its share of what it is given: half of each process's own data was dropped silently."""
    output = str(tmp_path / "pruned")
    multiprocessing.spawn(_prune_on, args=(2, str(tmp_path / "init"), output, "each its own"), nprocs=2, join=True)
    for rank in range(2):
        assert "the processes were given different calibration data" in torch.load(f"{output}.{rank}")


def test_compress_refuses_a_step_that_cannot_run_multi_process_before_any_step_runs(monkeypatch):
    """recipe[1] was refused by prune after recipe[0] had pruned every linear."""
    import importlib

    from optimum_prune import compress

    monkeypatch.setattr(importlib.import_module("optimum_prune.compress"), "is_distributed", lambda: True)  # the module, not the function
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    recipe = [PruningConfig(method="wanda", sparsity=0.3), PruningConfig(method="layers", sparsity=0.25)]
    with pytest.raises(ValueError, match=r"recipe\[1\]: multi-process calibration supports the per-layer methods"):
        compress(model, recipe, calibration=token_windows())
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_cli_under_torchrun_refuses_a_method_that_cannot_run_multi_process_before_loading_the_model(monkeypatch, tmp_path, capsys):
    from optimum_prune import cli

    monkeypatch.setenv("WORLD_SIZE", "2")

    def loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(cli, "init_from_launcher", loading)
    monkeypatch.setattr(cli, "load_model", loading)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", str(tmp_path), "--method", "layers", "--sparsity", "0.25", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "multi-process calibration supports the per-layer methods" in capsys.readouterr().err


def test_structured_methods_refuse_multi_process_calibration(monkeypatch):
    monkeypatch.setattr("optimum_prune.api.is_distributed", lambda: True)
    with pytest.raises(ValueError, match="multi-process calibration supports the per-layer methods"):
        prune(tiny_model(), PruningConfig(method="layers", sparsity=0.25), calibration=token_windows())


def test_a_registered_method_that_sums_no_statistics_across_processes_is_refused(monkeypatch, scratch_methods):
    """Each process would prune on its own share of the windows: masks would differ between ranks."""
    from optimum_prune.methods import LayerPruner, register_method

    @register_method("column_norms")
    class ColumnNorms(LayerPruner):
        def add_batch(self, inputs):
            pass

        def prune(self, target):
            pass

    monkeypatch.setattr("optimum_prune.api.is_distributed", lambda: True)
    with pytest.raises(ValueError, match=r"'column_norms' gathers calibration statistics but does not sum them across processes \(ColumnNorms.synchronize\)"):
        prune(tiny_model(), PruningConfig(method="column_norms"), calibration=token_windows())


def test_cli_under_torchrun_saves_once_what_one_process_saves(model_dir, tmp_path):
    import subprocess
    import sys

    from optimum_prune.models import load_model

    # 130-token windows: longer than the tiny model's 128-token context, so every process would warn
    arguments = ["--model", str(model_dir), "--method", "wanda", "--sparsity", "0.5", "--calibration-samples", "4", "--seq-len", "130"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "optimum_prune.cli"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # torchrun leaves a torchelastic_* folder
    launched = subprocess.run([*launcher, *arguments, "--output", str(tmp_path / "two")], check=True, env=environment, capture_output=True, text=True)
    assert launched.stderr.count("are longer than") == 1  # the first process speaks for all (each warned, and drew its bars)
    subprocess.run([sys.executable, "-m", "optimum_prune.cli", *arguments, "--output", str(tmp_path / "one")], check=True, env=environment, capture_output=True)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no rank left a staging directory behind
    two, one = (load_model(tmp_path / name)[0].state_dict() for name in ("two", "one"))
    for name, weight in one.items():
        assert torch.equal(two[name] == 0, weight == 0), name
        torch.testing.assert_close(two[name], weight)  # the same masks, and Wanda changes nothing else


def _projection_step(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A distillation width projection fitted on a batch, then one loss backward: (weight, gradient)."""
    from optimum_prune.distillation import _fit_projection, average_gradients_across_processes

    projection = torch.nn.Linear(student.shape[-1], teacher.shape[-1], bias=False)
    average_gradients_across_processes(projection.parameters())
    _fit_projection(projection, student, teacher, None)
    (projection(student) - teacher).pow(2).mean().backward()
    return projection.weight.detach().clone(), projection.weight.grad.clone()


def _states(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    return torch.randn(2, 6, 8, generator=generator), torch.randn(2, 6, 12, generator=generator)


def _fit_and_step(rank: int, world: int, init_file: str, output: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_projection_step(*_states(rank)), f"{output}.{rank}")
    finally:
        dist.destroy_process_group()


def test_distillation_projections_are_fitted_and_trained_alike_in_every_process(tmp_path):
    """They live outside the DDP-wrapped student: their fit and gradients are shared explicitly."""
    output = str(tmp_path / "projection")
    multiprocessing.spawn(_fit_and_step, args=(2, str(tmp_path / "init"), output), nprocs=2, join=True)
    (weight_0, gradient_0), (weight_1, gradient_1) = (torch.load(f"{output}.{rank}") for rank in range(2))
    states = [_states(rank) for rank in range(2)]
    weight, _ = _projection_step(torch.cat([s for s, _ in states]), torch.cat([t for _, t in states]))
    torch.testing.assert_close(weight_0, weight)  # one fit on both processes' batches
    torch.testing.assert_close(weight_1, weight)
    gradients = []  # each process's own gradient at that weight
    for student, teacher in states:
        shared = weight.clone().requires_grad_(True)
        (student @ shared.T - teacher).pow(2).mean().backward()
        gradients.append(shared.grad)
    assert not torch.allclose(gradients[0], gradients[1])
    torch.testing.assert_close(gradient_0, (gradients[0] + gradients[1]) / 2)  # averaged, as DDP averages
    torch.testing.assert_close(gradient_1, gradient_0)
