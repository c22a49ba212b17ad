"""prune leaves what the caller set as it was: parameters' requires_grad and pending gradients, the decoder-layer
objects (with their hooks and gradient checkpointing), torch's random stream; and an enclosing
``torch.inference_mode()`` or ``torch.autocast`` changes nothing."""

from __future__ import annotations

import pytest
import torch

from optimum_prune import PruningConfig, prune, save_pruned
from optimum_prune.calibration.gradients import fisher_rows

from .conftest import tiny_model, token_windows

STRUCTURED = {
    "slicegpt": PruningConfig(method="slicegpt", sparsity=0.2),
    "width": PruningConfig(method="width", sparsity=0.25),
    "width taylor": PruningConfig(method="width", sparsity=0.25, method_options={"criterion": "taylor"}),
    "layers taylor": PruningConfig(method="layers", sparsity=0.34, method_options={"criterion": "taylor"}),
    "low_rank": PruningConfig(method="low_rank", sparsity=0.2),
}


@pytest.mark.parametrize("name", ["slicegpt", "width", "low_rank"])
def test_frozen_parameters_stay_frozen(name):
    """torch-pruning's slices and SliceGPT's rotations made new parameters, all trainable; low_rank's Fisher pass
    failed on a frozen weight ("cannot register a hook on a tensor that doesn't require gradient")."""
    model = tiny_model()
    model.requires_grad_(False)
    prune(model, STRUCTURED[name], calibration=token_windows(4, 16))
    assert not any(parameter.requires_grad for parameter in model.parameters())
    assert not any(getattr(parameter, "_post_accumulate_grad_hooks", None) for parameter in model.parameters())


def test_a_partly_frozen_model_keeps_each_parameters_flag():
    model = tiny_model()
    model.get_input_embeddings().requires_grad_(False)
    model.model.layers[1].mlp.up_proj.requires_grad_(False)
    prune(model, STRUCTURED["width"], calibration=token_windows(4, 16))
    frozen = sorted(name for name, parameter in model.named_parameters() if not parameter.requires_grad)
    # FLAP's compensation gives every MLP linear a bias (Llama's one mlp_bias flag): the frozen one's stays frozen
    assert frozen == ["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.bias", "model.layers.1.mlp.up_proj.weight"]


def test_slicegpt_keeps_the_decoder_layer_objects_with_their_hooks_and_gradient_checkpointing():
    """It built new layer objects: gradient checkpointing silently stopped (is_gradient_checkpointing still said
    True), and a caller's hooks and attributes on a layer were gone."""
    model = tiny_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layer = model.model.layers[1]
    layer.note = "kept"
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(1))
    prune(model, STRUCTURED["slicegpt"], calibration=token_windows(4, 16))
    assert model.model.layers[1] is layer and layer.note == "kept" and layer.gradient_checkpointing
    attention_calls = []
    handle = layer.self_attn.register_forward_hook(lambda *_: attention_calls.append(1))
    calls.clear()
    ids = token_windows(2, 8)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    handle.remove()
    assert calls and len(attention_calls) == 2  # the forward, then its recomputation in backward


def test_pending_training_gradients_are_neither_added_to_nor_erased():
    model, windows = tiny_model(), token_windows(4, 16)
    pending = {name: torch.full_like(parameter, 0.5) for name, parameter in model.named_parameters()}
    for name, parameter in model.named_parameters():
        parameter.grad = pending[name].clone()
    prune(model, STRUCTURED["layers taylor"], calibration=windows)
    assert all(torch.equal(parameter.grad, pending[name]) for name, parameter in model.named_parameters())

    linears = [layer.self_attn.o_proj for layer in model.model.layers]
    with_pending = fisher_rows(model, windows, linears)
    for linear in linears:
        linear.weight.grad = None
    assert all(torch.equal(a, b) for a, b in zip(with_pending, fisher_rows(model, windows, linears)))


@pytest.mark.parametrize("name", ["slicegpt", "low_rank", "width"])
def test_the_callers_random_stream_is_not_drawn_from(name):
    model = tiny_model()
    state = torch.get_rng_state()
    prune(model, STRUCTURED[name], calibration=token_windows(4, 16))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("mode", ["inference_mode", "autocast"])
@pytest.mark.parametrize("config", [
    PruningConfig(method="sparsegpt", sparsity=0.5), STRUCTURED["width taylor"], STRUCTURED["slicegpt"], STRUCTURED["low_rank"],
], ids=["sparsegpt", "width taylor", "slicegpt", "low_rank"])  # fmt: skip
def test_an_enclosing_inference_mode_or_autocast_changes_nothing(mode, config):
    """Under inference mode gradient criteria failed and new parameters were inference tensors no training could use;
    under autocast the float32 statistics ran in bfloat16 (SparseGPT's Cholesky failed, other methods gave other
    weights)."""
    windows = token_windows(4, 16)
    expected = tiny_model()
    prune(expected, config, calibration=windows)
    model = tiny_model()
    with torch.inference_mode() if mode == "inference_mode" else torch.autocast("cpu", dtype=torch.bfloat16):
        prune(model, config, calibration=windows)
    actual = model.state_dict()
    assert actual.keys() == expected.state_dict().keys()
    assert all(torch.equal(actual[name], tensor) for name, tensor in expected.state_dict().items())
    assert not any(parameter.is_inference() for parameter in model.parameters())


def failing_at_call(original, call: int, error: BaseException):
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise error
        return original(*args, **kwargs)

    return failing


def test_a_run_that_fails_while_changing_the_model_says_how_far_it_got(monkeypatch):
    """The note said "its config records no pruning" of a model whose config records an earlier step, and not
    which layers were changed."""
    from optimum_prune.methods.wanda import WandaPruner

    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.3))
    monkeypatch.setattr(WandaPruner, "prune", failing_at_call(WandaPruner.prune, 9, RuntimeError("out of memory")))  # layer 1's second
    with pytest.raises(RuntimeError, match="out of memory") as caught:
        prune(model, PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows(4, 16))
    note = "\n".join(caught.value.__notes__)
    assert "weights are partly pruned" in note and "layers it changed: 0, 1)" in note
    assert "records no pruning" not in note


def test_a_run_that_fails_before_changing_a_weight_says_the_model_is_as_it_was(monkeypatch):
    from optimum_prune import runs

    model = tiny_model()
    monkeypatch.setattr(runs, "feed_layer", failing_at_call(runs.feed_layer, 1, RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory") as caught:
        prune(model, PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows(4, 16))
    assert "stopped before changing any weight: the model is as it was" in "\n".join(caught.value.__notes__)
    prune(model, PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows(4, 16))  # not refused


@pytest.mark.parametrize("method", ["width", "low_rank"])
def test_a_model_whose_prune_stopped_part_way_is_refused_by_save_pruned_and_prune(monkeypatch, tmp_path, method):
    """save_pruned wrote the half-pruned model the note said to load again: width's checkpoint failed to reload (its
    config keeps the dense widths), low_rank's reloaded with random weights in the factorised linears, silently."""
    import optimum_prune.methods.low_rank as low_rank
    import optimum_prune.methods.units as units

    model, windows = tiny_model(), token_windows(4, 16)
    if method == "width":
        monkeypatch.setattr(units.UnitPlan, "cut", failing_at_call(units.UnitPlan.cut, 2, torch.OutOfMemoryError("simulated")))
    else:
        monkeypatch.setattr(low_rank, "factorize", failing_at_call(low_rank.factorize, 5, torch.OutOfMemoryError("simulated")))
    config = PruningConfig(method=method, sparsity=0.25)
    with pytest.raises(torch.OutOfMemoryError):
        prune(model, config, calibration=windows)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="cannot save it .nothing was saved.: prune.. stopped while changing the model"):
        save_pruned(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="cannot prune it: prune.. stopped"):
        prune(model, config, calibration=windows)


def test_slicegpt_on_a_model_with_accelerate_hooks_equals_the_plain_run():
    """The hook called the stock forward it had bound, and the shortcut layer failed at a size mismatch."""
    from accelerate import dispatch_model

    windows, config = token_windows(4, 16), STRUCTURED["slicegpt"]
    expected = tiny_model()
    prune(expected, config, calibration=windows)
    model = tiny_model()
    placement = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = dispatch_model(model, device_map={**placement, **{f"model.layers.{i}": "cpu" for i in range(3)}}, force_hooks=True)
    prune(model, config, calibration=windows)
    ids = token_windows(2, 8, seed=5)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected(input_ids=ids).logits)


def test_a_model_made_under_inference_mode_is_pruned_there():
    """Its weights are inference tensors, which only inference mode may change in place."""
    windows = token_windows(4, 16)
    expected = tiny_model()
    prune(expected, PruningConfig(method="wanda", sparsity=0.5), calibration=windows)
    with torch.inference_mode():
        model = tiny_model()
        prune(model, PruningConfig(method="wanda", sparsity=0.5), calibration=windows)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
        with pytest.raises(Exception) as caught:  # noqa: PT011 (torch-pruning's ValueError)
            prune(model, STRUCTURED["width taylor"], calibration=windows)
    assert sum("the model's weights are inference tensors" in note for note in caught.value.__notes__) == 1  # said once


def test_factors_of_frozen_linears_stay_frozen_in_a_partly_frozen_model():
    model = tiny_model()
    for layer in model.model.layers:
        for linear in (*layer.self_attn.children(), *layer.mlp.children()):
            if isinstance(linear, torch.nn.Linear):
                linear.requires_grad_(False)
    prune(model, STRUCTURED["low_rank"], calibration=token_windows(4, 16))
    factors = [name for name, parameter in model.named_parameters() if "_factor." in name]
    assert factors and not any(parameter.requires_grad for name, parameter in model.named_parameters() if "_factor." in name)
    assert model.model.layers[0].input_layernorm.weight.requires_grad


def test_pending_gradients_come_back_on_the_device_and_dtype_their_parameter_has_after_the_pass():
    """width's Taylor pass ends after on_device moved the model home, with the held gradients on the compute device."""
    from optimum_prune.calibration.gradients import own_gradients

    linear = torch.nn.Linear(4, 4)
    linear.weight.grad = torch.ones(4, 4)
    with own_gradients([linear.weight]):
        linear.to(torch.float64)  # moves parameters as a device change does
    assert linear.weight.grad.dtype == torch.float64 and torch.equal(linear.weight.grad, torch.ones(4, 4, dtype=torch.float64))


def test_a_model_compiled_by_torch_compile_is_pruned_through_its_wrapper():
    """get_adapter refused the OptimizedModule (save_pruned already unwrapped it)."""
    windows, ids = token_windows(4, 16), token_windows(2, 8, seed=5)
    expected = tiny_model()
    prune(expected, STRUCTURED["width"], calibration=windows)
    compiled = torch.compile(tiny_model(), backend="eager")
    with torch.no_grad():
        compiled(input_ids=ids)  # traced at the dense shapes first
    prune(compiled, STRUCTURED["width"], calibration=windows)
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=ids).logits, expected(input_ids=ids).logits)
    assert compiled.config.pruning_config["method"] == "width"


@pytest.mark.parametrize(
    "config",
    [
        PruningConfig(method="width", sparsity=0.2, method_options={"criterion": "random"}),
        PruningConfig(method="ziplm", sparsity=0.3, method_options={"target": "parameters", "round_to": 8}),
        PruningConfig(method="sparsegpt", sparsity=0.5),
        PruningConfig(method="llm_surgeon", sparsity=0.5, method_options={"shots": 1}),
    ],
    ids=lambda config: config.method,
)
def test_the_callers_default_dtype_does_not_change_the_result(config):
    """Tensors made without a dtype took the caller's default: random scores and ZipLM's search drew other values
    under float64, and LLM Surgeon's factors failed to factorise under bfloat16."""
    windows = token_windows(samples=4, seq_len=16)
    expected = tiny_model()
    prune(expected, config, calibration=windows)
    for default in (torch.float64, torch.bfloat16):
        model = tiny_model()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            prune(model, config, calibration=windows)
        finally:
            torch.set_default_dtype(previous)
        for (name, tensor), reference in zip(model.state_dict().items(), expected.state_dict().values()):
            assert torch.equal(tensor, reference), (default, name)


def test_prune_keeps_each_modules_own_training_flag():
    """model.train(was_training) set every module alike: a layer the caller had put in eval came back training."""
    model = tiny_model()
    model.train()
    model.model.layers[1].eval()
    before = {name: module.training for name, module in model.named_modules()}
    prune(model, PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows(4, 16))
    assert {name: module.training for name, module in model.named_modules()} == before


def test_depth_pruning_leaves_each_kept_layer_in_its_own_mode():
    """Modes were put back by name: removing layer 0 (kept in eval, frozen) handed its mode to the layer renumbered
    into its place, and that layer stopped training."""
    model = tiny_model(num_hidden_layers=4).train()
    model.model.layers[0].eval()
    kept = {module: module.training for module in model.model.layers[1].modules()}
    prune(model, PruningConfig(method="layers", sparsity=0.25, method_options={"criterion": "angular"}), calibration=token_windows(4, 16))
    assert model.model.layers[0] is next(iter(kept))  # layer 0 was the one removed
    assert all(module.training == training for module, training in kept.items())


@pytest.mark.parametrize("method", ["width", "kprune", "ziplm", "mask_search", "llm_surgeon_structured"])
def test_width_pruning_leaves_each_module_in_its_own_training_mode(method):
    """Torch-Pruning's trace of each MLP put it in eval mode for good: a model pruned while training came back with
    every layer's MLP in eval mode (no dropout where the caller trains)."""
    model = tiny_model()
    model.train()
    model.model.layers[1].eval()
    before = {name: module.training for name, module in model.named_modules()}
    prune(model, PruningConfig(method=method, sparsity=0.25), calibration=token_windows(4, 16))
    after = {name: module.training for name, module in model.named_modules()}
    assert after == {name: before[name] for name in after}  # (ziplm may remove a whole MLP)


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_a_device_this_machine_cannot_use_is_refused_before_any_weight_changes(device):
    """Only CUDA was asked: device='meta' moved layer 0 there and lost its weights ("Cannot copy out of meta
    tensor"); an absent mps / xpu gave torch's error, which names no field."""
    if device != "meta" and getattr(torch, device).is_available():
        pytest.skip(f"this machine: {device} is available")
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="^device '"):
        prune(model, PruningConfig(method="magnitude", sparsity=0.5), device=device)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())


@pytest.mark.parametrize("training", [False, True])
def test_prune_gives_the_model_back_in_the_mode_it_was_in(training):
    model = tiny_model()
    model.train(training)
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    assert model.training is training
    assert all(module.training is training for module in model.modules())


@pytest.mark.parametrize("shared", ["module", "weight"])
@pytest.mark.parametrize("method", ["width", "slicegpt", "low_rank"])
def test_a_weight_two_decoder_layers_share_is_refused_by_methods_that_reshape_it(method, shared):
    """Width crashed midway (IndexError, the model half changed), SliceGPT left a model that no longer ran, low_rank
    failed in its Fisher pass; a shared weight alone was untied silently."""
    model = tiny_model()
    if shared == "module":
        model.model.layers[1].mlp = model.model.layers[0].mlp
    else:
        model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.(\w+).weight is model.layers.0.mlp.\1.weight: a weight shared by two decoder layers cannot be changed by"):
        prune(model, STRUCTURED[method], calibration=token_windows(4, 16))
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    prune(model, PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows(4, 16))  # zeroing keeps the sharing
    assert model.model.layers[1].mlp.up_proj.weight is model.model.layers[0].mlp.up_proj.weight


@pytest.mark.parametrize("method", ["layers", "sublayers"])
def test_removing_whole_layers_or_sublayers_keeps_a_module_two_layers_share(method):
    """Removing a block changes no weight another layer holds: block-wise sharing (MobileLLM) prunes as before."""
    def shared() -> torch.nn.Module:
        model = tiny_model(num_hidden_layers=4)
        model.model.layers[3].mlp = model.model.layers[2].mlp
        return model

    assert prune(shared(), PruningConfig(method=method, sparsity=0.25), calibration=token_windows(4, 16)).removed
    with pytest.raises(ValueError, match="a weight shared by two decoder layers cannot be changed by layers"):  # LaCo adds into the kept one
        prune(shared(), PruningConfig(method="layers", sparsity=0.25, method_options={"merge": True}), calibration=token_windows(4, 16))


def test_fisher_rows_of_linears_sharing_a_weight_are_its_rows():
    """One hook per linear on the same weight: the first freed the gradient the second then read (None)."""
    model = tiny_model()
    mlp = model.model.layers[0].mlp
    mlp.gate_proj.weight = mlp.up_proj.weight
    rows = fisher_rows(model, token_windows(2, 16), [mlp.up_proj, mlp.gate_proj, mlp.down_proj])
    assert torch.equal(rows[0], rows[1]) and rows[0].shape == (mlp.up_proj.out_features,) and bool((rows[0] > 0).all())
