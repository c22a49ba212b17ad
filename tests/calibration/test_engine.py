import copy
import gc

import pytest
import torch
from torch import nn

from optimum_prune import PruningConfig, get_adapter, prune
from optimum_prune.calibration import capture_first_layer_inputs, run_layer, walk_layers
from optimum_prune.methods import METHODS

from ..conftest import tiny_model, token_windows


def _reference_prune(model: nn.Module, windows: torch.Tensor, config: PruningConfig) -> None:
    """Layer i's statistics come from full-model forwards through the already-pruned layers < i."""
    method = METHODS.get(config.method)
    options = config.build_method_options()
    for layer in model.model.layers:
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        pruners = {name: method.create(linear, options) for name, linear in linears.items()}
        hooks = [
            linear.register_forward_pre_hook(lambda _m, args, name=name: pruners[name].add_batch(args[0]))
            for name, linear in linears.items()
        ]
        with torch.no_grad():
            for window in windows:
                model(input_ids=window[None], use_cache=False)
        for hook in hooks:
            hook.remove()
        for pruner in pruners.values():
            pruner.prune(config.target)


@pytest.mark.parametrize("method,sparsity", [("wanda", 0.5), ("sparsegpt", 0.5), ("sparsegpt", "2:4")])
def test_sequential_engine_equals_layer_by_layer_reference(method, sparsity):
    config = PruningConfig(method=method, sparsity=sparsity)
    windows = token_windows(samples=6, seq_len=24)
    engine_model, reference_model = tiny_model(), tiny_model()
    prune(engine_model, config, calibration=windows)
    _reference_prune(reference_model, windows, config)
    for (name, engine_weight), reference_weight in zip(
        engine_model.state_dict().items(), reference_model.state_dict().values()
    ):
        assert torch.equal(engine_weight == 0, reference_weight == 0), name
        torch.testing.assert_close(engine_weight, reference_weight, rtol=1e-5, atol=1e-6, msg=name)


def _live_activation_bytes(model: nn.Module) -> int:
    owned = {id(t) for t in (*model.parameters(), *model.buffers())}
    return sum(
        obj.numel() * obj.element_size()
        for obj in gc.get_objects()
        if type(obj) is torch.Tensor and id(obj) not in owned and obj.device.type == "cpu"
    )


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_each_layer_runs_with_the_attention_mask_it_gets_in_the_model(attn_implementation):
    """Layer 0's mask served every layer: Qwen2's sliding-window layers were calibrated with full attention."""
    from optimum_prune.calibration import capture_first_layer_inputs, run_layer

    windows = token_windows(samples=2, seq_len=16)
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1, attn_implementation=attn_implementation)
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    adapter = get_adapter(model)
    inputs = capture_first_layer_inputs(adapter, windows, torch.device("cpu"))
    with torch.no_grad():
        expected = [model(input_ids=window[None], output_hidden_states=True).hidden_states for window in windows]
    for index, layer in enumerate(adapter.decoder_layers()[:-1]):
        inputs.hidden_states = run_layer(adapter, layer, inputs)
        for window, hidden in enumerate(inputs.hidden_states):
            torch.testing.assert_close(hidden, expected[window][index + 1])


def test_activation_memory_does_not_grow_with_depth():
    windows = token_windows(samples=16, seq_len=64)
    peaks = {}
    for depth in (2, 8):
        model = tiny_model(num_hidden_layers=depth)
        adapter = get_adapter(model)
        seen = []
        gc.collect()
        before = _live_activation_bytes(model)  # tensors other tests still hold
        walk_layers(adapter, windows, torch.device("cpu"), lambda i, layer, inputs: seen.append(_live_activation_bytes(model)), "test")
        peaks[depth] = max(seen) - before
        assert len(seen) == depth
    one_buffer = 16 * 64 * 64 * 4  # samples × seq_len × hidden × fp32
    assert peaks[8] <= peaks[2] + one_buffer // 4, peaks
    assert peaks[8] < 4 * one_buffer, peaks


def test_same_seed_same_masks_another_seed_other_masks(bpe_tokenizer):
    from optimum_prune.data import wikipedia_articles

    texts = wikipedia_articles("calibration")[:4]
    masks = []
    for seed in (7, 7, 8):
        config = PruningConfig(method="wanda", sparsity=0.5, num_calibration_samples=4, calibration_seq_len=32, seed=seed)
        model = tiny_model()
        prune(model, config, calibration=texts, tokenizer=bpe_tokenizer)
        masks.append([p == 0 for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(masks[0], masks[1]))
    assert not all(torch.equal(a, b) for a, b in zip(masks[0], masks[2]))  # the seed picks the windows


def test_layers_return_to_their_device_and_config_recorded(llama, windows):
    prune(llama, PruningConfig(method="sparsegpt", sparsity="4:8"), calibration=windows, device="cpu")
    assert {p.device.type for p in llama.parameters()} == {"cpu"}
    assert llama.config.pruning_config["sparsity"] == "4:8"


def test_cuda_device_without_cuda_is_clear(llama, windows):
    if torch.cuda.is_available():
        pytest.skip("this machine: it has CUDA, and the test is of one without")
    with pytest.raises(ValueError, match="CUDA is not available"):
        prune(llama, PruningConfig(), calibration=windows, device="cuda")


def test_ignore_patterns_keep_modules_dense(llama, windows):
    report = prune(
        llama, PruningConfig(method="wanda", sparsity=0.5, ignore=["*.o_proj", "model.layers.0.*"]), calibration=windows
    )
    names = {r.name for r in report.linears}
    assert not any(n.endswith("o_proj") or n.startswith("model.layers.0.") for n in names)
    assert bool((llama.model.layers[0].mlp.up_proj.weight != 0).all())
    assert len(names) == 2 * 6


@pytest.mark.parametrize(
    "method, ignore, message",
    [
        ("wanda", ["*.q_prj", "lm_head", "*.o_proj"], r"PruningConfig.ignore pattern\(s\) '\*.q_prj' match no module of LlamaForCausalLM \(names look like 'model.layers.0.self_attn.q_proj'\)"),
        ("width", ["model.layer.0.*"], r"PruningConfig.ignore pattern\(s\) 'model.layer.0.\*' match no module"),
        ("wanda", ["model.layers.*"], r"PruningConfig.ignore \['model.layers.\*'\] leaves no linear of the language part to prune"),
        ("llm_surgeon", ["*proj"], r"PruningConfig.ignore \['\*proj'\] leaves no linear of the language part to prune"),  # whole-model
    ],
)
def test_ignore_patterns_that_match_nothing_or_everything_are_refused(windows, method, ignore, message):
    model = tiny_model()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        prune(model, PruningConfig(method=method, sparsity=0.25, ignore=ignore), calibration=windows)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_impossible_pattern_fails_before_any_weight_changes(windows):
    model = tiny_model(intermediate_size=130)  # down_proj has 130 inputs: not a multiple of 4
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"sparsity '2:4' cannot be applied to model.layers.0.mlp.down_proj: in_features=130"):
        prune(model, PruningConfig(method="wanda", sparsity="2:4"), calibration=windows)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_training_mode_is_restored(llama, windows):
    llama.train()
    prune(llama, PruningConfig(method="wanda", sparsity=0.5), calibration=windows)
    assert llama.training


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_a_layer_is_visited_beside_one_activation_buffer_and_batches_share_their_layer_arguments(attn_implementation):
    """The previous layer's inputs stayed alive through the next visit (three buffers at the next run), and each
    window's identical mask and position embeddings were held once per window (host memory grew with the
    calibration set under activation_device="disk")."""
    samples, seq_len, hidden = 16, 64, 64
    model = tiny_model(num_hidden_layers=3, attn_implementation=attn_implementation)
    gc.collect()
    before = _live_activation_bytes(model)
    seen, arguments = [], []

    def visit(_index, _layer, inputs):
        seen.append(_live_activation_bytes(model) - before)
        arguments.append(inputs.layer_kwargs)

    walk_layers(get_adapter(model), token_windows(samples=samples, seq_len=seq_len), torch.device("cpu"), visit, "test")
    one_buffer = samples * seq_len * hidden * 4
    assert max(seen) < 1.5 * one_buffer, (seen, one_buffer)  # was 2.8 buffers (three at the next run)
    tensors = [[t for t in _tensors(kwargs)] for kwargs in arguments[0]]
    assert tensors[0] and all(len(ts) == len(tensors[0]) and all(t is t0 for t, t0 in zip(ts, tensors[0])) for ts in tensors)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def test_disk_activations_give_the_same_result_hold_two_layers_at_most_and_leave_nothing(llama, windows, tmp_path, monkeypatch):
    import tempfile

    from optimum_prune.calibration import capture_first_layer_inputs
    from optimum_prune.calibration.engine import DiskActivations

    in_memory = capture_first_layer_inputs(get_adapter(llama), windows, torch.device("cpu"))
    on_disk = capture_first_layer_inputs(get_adapter(llama), windows, torch.device("cpu"), activation_device=tmp_path)
    assert isinstance(on_disk.hidden_states, DiskActivations) and len(on_disk.hidden_states) == len(windows)
    assert all(torch.equal(a, b) for a, b in zip(in_memory.hidden_states, on_disk.hidden_states))
    assert on_disk.num_bytes >= in_memory.num_bytes
    on_disk.hidden_states.release()

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    buffers: list[int] = []
    original = DiskActivations.__init__

    def counting(self, directory):
        original(self, directory)
        buffers.append(sum(1 for _ in directory.parent.iterdir()))  # buffers present, this one included

    monkeypatch.setattr(DiskActivations, "__init__", counting)
    config = PruningConfig(method="sparsegpt", sparsity=0.5)
    offloaded = copy.deepcopy(llama)
    prune(llama, config, calibration=windows)
    prune(offloaded, config, calibration=windows, activation_device="disk")
    assert all(torch.equal(a, b) for a, b in zip(llama.parameters(), offloaded.parameters()))
    assert len(buffers) == len(llama.model.layers) + 1 and max(buffers) == 2
    assert not any(scratch.iterdir())  # the temporary directory is gone


def test_activations_a_killed_run_left_on_disk_are_reclaimed_by_the_next_run(llama, windows, tmp_path, monkeypatch):
    """A run killed outright (SIGKILL, the out-of-memory killer) left its activation folder in $TMPDIR, gigabytes,
    for good. A running one holds its folder locked, which the kernel releases when the run dies."""
    import os
    import tempfile
    import time

    from optimum_prune.atomic_files import exclusive_lock
    from optimum_prune.calibration.engine import DiskActivations

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed, running, young = (tmp_path / f"optimum-prune-activations-{name}" for name in ("killed", "running", "young"))
    for folder in (killed, running, young):
        (folder / "layer").mkdir(parents=True)
    for folder in (killed, running):
        os.utime(folder, (time.time() - 3600,) * 2)
    others_lock = os.open(running, os.O_RDONLY)
    assert exclusive_lock(others_lock)
    locked_by_this_run: list[bool] = []
    original = DiskActivations.__init__

    def checking_its_lock(self, directory):
        original(self, directory)
        home = os.open(directory.parent, os.O_RDONLY)
        locked_by_this_run.append(exclusive_lock(home) is False)
        os.close(home)

    monkeypatch.setattr(DiskActivations, "__init__", checking_its_lock)
    try:
        prune(llama, PruningConfig(method="wanda", sparsity=0.5), calibration=windows, activation_device="disk")
    finally:
        os.close(others_lock)
    assert locked_by_this_run and all(locked_by_this_run)
    assert sorted(path.name for path in tmp_path.iterdir()) == [running.name, young.name]  # and this run's is gone


def test_activation_device_is_taken_by_the_per_layer_methods_and_refused_by_the_others(llama, windows):
    """Here compute and activations share the CPU; test_cuda.py checks that offloading from a GPU gives the
    same masks with less GPU memory."""
    config = PruningConfig(method="sparsegpt", sparsity=0.5)
    offloaded = copy.deepcopy(llama)
    prune(llama, config, calibration=windows)
    prune(offloaded, config, calibration=windows, activation_device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(llama.parameters(), offloaded.parameters()))
    with pytest.raises(ValueError, match="activation_device applies to the per-layer methods"):
        prune(offloaded, PruningConfig(method="width", sparsity=0.2), calibration=windows, activation_device="cpu")


def test_stopping_the_forward_at_layer_0_leaves_no_output_recorder_behind():
    """With output_router_logits in the config, transformers wraps every MoE block's forward and unwraps it only
    when the model's forward returns: calibration's stopped forwards left the wrappers on, holding dead outputs,
    and skip_experts then refused the blocks as patched by another variant."""
    from optimum_prune import enable_early_exit, skip_experts

    from ..adapters.test_moe import tiny_moe

    model = tiny_moe(output_router_logits=True, num_hidden_layers=3)
    prune(model, PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows(2, 16))
    enable_early_exit(model, 1)
    assert not [name for name, module in model.named_modules() if "forward" in vars(module)]
    skip_experts(model, calibration=token_windows(2, 16), num_samples=2, seq_len=16).remove()


def test_progress_bars_follow_transformers_switch(capfd):
    """transformers.utils.logging.disable_progress_bar() (also set by HF_HUB_DISABLE_PROGRESS_BARS) silences ours too."""
    from transformers.utils import logging as transformers_logging

    prune(tiny_model(), PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows())
    assert "Pruning (wanda)" in capfd.readouterr().err
    transformers_logging.disable_progress_bar()
    try:
        prune(tiny_model(), PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows())
    finally:
        transformers_logging.enable_progress_bar()
    assert "Pruning" not in capfd.readouterr().err


def test_an_observing_walk_runs_each_layer_once_and_sees_what_the_next_layer_gets():
    """Statistics walks (width, KCM, sublayers, OWL) ran every layer twice: once to feed the hooks, once to propagate."""
    from contextlib import contextmanager

    from optimum_prune.calibration import observe_layers

    model = tiny_model(num_hidden_layers=3)
    adapter = get_adapter(model)
    calls = [0] * 3
    for index, layer in enumerate(adapter.decoder_layers()):
        layer.register_forward_pre_hook(lambda _m, _a, index=index: calls.__setitem__(index, calls[index] + 1))
    seen = {}

    @contextmanager
    def observe(index, layer):
        handle = layer.register_forward_hook(lambda _m, _a, output: seen.setdefault(index, []).append(output))
        yield
        handle.remove()

    windows = token_windows(samples=4, seq_len=16)
    observe_layers(adapter, windows, torch.device("cpu"), observe, "test")
    batches = len(seen[0])
    assert calls == [2 * batches, batches, batches]  # layer 0's first call per batch is the capture, stopped at its pre-hook
    inputs_of_layer_1 = []
    walk_layers(adapter, windows, torch.device("cpu"), lambda i, _l, inputs: inputs_of_layer_1.extend(inputs.hidden_states) if i == 1 else None, "t")
    outputs = [output[0] if isinstance(output, tuple) else output for output in seen[0]]
    assert all(torch.equal(a, b) for a, b in zip(outputs, inputs_of_layer_1))


def test_batches_of_one_shape_keep_their_own_masks():
    """Layer arguments are shared between batches only where they are equal: two batches of one shape with other
    (packed, 4-D) masks each run every layer with their own, as in the model."""
    ids = token_windows(samples=2, seq_len=16)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    packed = causal.clone()
    packed[8:, :8] = False  # two samples packed in one row
    batches = [{"input_ids": ids[:1], "attention_mask": causal[None, None]}, {"input_ids": ids[1:], "attention_mask": packed[None, None]}]
    model = tiny_model()
    adapter = get_adapter(model)
    inputs = capture_first_layer_inputs(adapter, batches, torch.device("cpu"))
    with torch.no_grad():
        expected = [model(**batch, output_hidden_states=True).hidden_states for batch in batches]
    for index, layer in enumerate(adapter.decoder_layers()[:-1]):
        inputs.hidden_states = run_layer(adapter, layer, inputs)
        for batch, hidden in enumerate(inputs.hidden_states):
            torch.testing.assert_close(hidden, expected[batch][index + 1])


@pytest.mark.parametrize("method", ["wanda", "width", "slicegpt"])
def test_an_out_of_memory_moving_the_embeddings_leaves_no_capture_hook(monkeypatch, method):
    """Layer 0's capturing pre-hook (which stops the forward) was registered outside the try that removes it: after a
    failed move to the compute device, every later forward of the model stopped there, and a second prune said "no
    calibration batch reached model.layers.0"."""
    model, windows = tiny_model(), token_windows(4, 16)
    embeddings, move = model.model.embed_tokens, nn.Module.to

    def out_of_memory_for_the_embeddings(self, *args, **kwargs):
        if self is embeddings:
            raise torch.OutOfMemoryError("simulated")
        return move(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", out_of_memory_for_the_embeddings)
    with pytest.raises(torch.OutOfMemoryError):
        prune(model, PruningConfig(method=method, sparsity=0.25), calibration=windows)
    monkeypatch.undo()
    assert not model.model.layers[0]._forward_pre_hooks
    with torch.no_grad():
        model(input_ids=windows[:1])
    prune(model, PruningConfig(method="wanda", sparsity=0.5), calibration=windows)


def test_on_device_moves_back_what_it_moved_when_a_later_move_fails(monkeypatch):
    """Every module was moved before the try that moves them back: one failing (out of memory) left the earlier ones
    on the compute device."""
    from optimum_prune.calibration.engine import on_device

    first, second, moves = nn.Linear(2, 2), nn.Linear(2, 2), []

    def to(self, device):
        if self is second and torch.device(device).type == "cuda":
            raise torch.OutOfMemoryError("simulated")
        moves.append((self, str(device)))
        return self  # recorded, not moved: no GPU needed

    monkeypatch.setattr(nn.Module, "to", to)
    with pytest.raises(torch.OutOfMemoryError):
        with on_device([first, second], torch.device("cuda")):
            pass
    assert moves == [(first, "cuda"), (first, "cpu"), (second, "cpu")]  # the half-moved one too
