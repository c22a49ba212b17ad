import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from optimum_prune import PruningConfig, prune, save_pruned

from ..conftest import assert_reloads_exactly, assert_stock_reload_matches, tiny_model, token_windows

def test_uniform_result_reloads_with_stock_transformers(tmp_path):
    model = tiny_model(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
    windows = token_windows()
    prune(model, PruningConfig(method="width", sparsity=0.3, method_options={"criterion": "taylor"}), calibration=windows)
    prune(model, PruningConfig(method="layers", sparsity=0.25), calibration=windows)
    output = save_pruned(model, tmp_path / "pruned")

    config = json.loads((output / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["head_dim"]) == (3, 6, 8)
    assert_stock_reload_matches(model, output, token_windows(samples=2, seq_len=16, seed=4), tmp_path)


@pytest.fixture(params=["qwen2", "qwen3", "gemma2", "gemma3"])
def non_uniform(request, tmp_path):
    model = tiny_model(request.param, num_hidden_layers=4, intermediate_size=256)
    windows = token_windows()
    prune(model, PruningConfig(method="width", sparsity=0.25, method_options={"criterion": "flap", "ranking": "global"}), calibration=windows)
    prune(model, PruningConfig(method="sublayers", sparsity=0.1, method_options={"sublayers": "attention"}), calibration=windows)
    return model, save_pruned(model, tmp_path / "pruned")


def test_non_uniform_result_reloads_bit_exact(non_uniform):
    model, output = non_uniform
    layers = json.loads((output / "config.json").read_text())["quantization_config"]["layers"]
    assert len({json.dumps(layer) for layer in layers}) > 1
    assert any(layer["num_attention_heads"] == 0 for layer in layers)
    assert any(layer["mlp_output_bias"] for layer in layers)  # FLAP compensation

    reloaded = assert_reloads_exactly(model, output)
    assert not reloaded.is_quantized and not hasattr(reloaded, "hf_quantizer")


@pytest.mark.parametrize(
    "config",
    [
        PruningConfig(method="sublayers", sparsity=0.2, method_options={"sublayers": "attention"}),
        PruningConfig(method="sublayers", sparsity=0.2, method_options={"sublayers": "mlp", "reroute": True}),
        PruningConfig(method="low_rank", sparsity=0.2, method_options={"weighting": "none"}),
    ],
    ids=["removed", "rerouted", "low_rank"],
)
def test_without_the_import_a_checkpoint_missing_stock_weights_fails_instead_of_loading_random_ones(config, tmp_path):
    """transformers filled a removed or factorised module's weights at random and only warned; the stand-in tensors
    saved under their names stop it at a size mismatch, and the structure loader skips them without a word."""
    import logging
    import subprocess
    import sys

    model = tiny_model(num_hidden_layers=4)
    prune(model, config, calibration=token_windows())
    output = save_pruned(model, tmp_path / "pruned")
    stock = subprocess.run(
        [sys.executable, "-c", f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(output)!r})"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert stock.returncode != 0 and "size mismatch" in stock.stderr and "torch.Size([1])" in stock.stderr
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        reloaded = assert_reloads_exactly(model, output)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [record for record in records if "were not used" in record.getMessage()]
    assert "_keys_to_ignore_on_load_unexpected" not in vars(reloaded)


def test_every_save_of_a_non_uniform_model_writes_the_stand_ins(tmp_path):
    """Not only save_pruned: a plain save_pretrained (what the Trainer's checkpoints and LLaMA-Factory's export
    call), of the pruned model or of one reloaded from its checkpoint, stops a stock load too."""
    import subprocess
    import sys

    model = tiny_model(num_hidden_layers=4)
    prune(model, PruningConfig(method="sublayers", sparsity=0.2, method_options={"sublayers": "attention"}), calibration=token_windows())
    model.save_pretrained(tmp_path / "plain")
    AutoModelForCausalLM.from_pretrained(tmp_path / "plain").save_pretrained(tmp_path / "again")
    load = "from transformers import AutoModelForCausalLM\nfor d in ('plain', 'again'):\n"
    load += "    try: AutoModelForCausalLM.from_pretrained(d); print(d, 'loaded')\n"
    load += "    except RuntimeError as e: print(d, 'refused' if 'size mismatch' in str(e) else e)"
    stock = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, cwd=tmp_path)
    assert stock.stdout.split() == ["plain", "refused", "again", "refused"], stock.stderr
    for directory in ("plain", "again"):
        assert_reloads_exactly(model, tmp_path / directory)


def test_a_save_given_a_gathered_state_dict_writes_the_stand_ins_too(tmp_path):
    """The Trainer under DeepSpeed or FSDP passes save_pretrained the state dict accelerate gathered."""
    from accelerate import Accelerator
    from safetensors.torch import load_file

    model = tiny_model(num_hidden_layers=4)
    prune(model, PruningConfig(method="sublayers", sparsity=0.2, method_options={"sublayers": "attention"}), calibration=token_windows())
    model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "gathered", state_dict=Accelerator().get_state_dict(model))
    assert load_file(tmp_path / "gathered" / "model.safetensors").keys() == load_file(tmp_path / "plain" / "model.safetensors").keys()
    assert_reloads_exactly(model, tmp_path / "gathered")


def test_stand_ins_load_back_copy_and_follow_a_lora_wrapped_model(tmp_path):
    """Only saves write them: the state dict itself stays the model's (torch's distributed checkpointing, as FSDP2
    saves, maps every key to a module attribute). The saved tensors load back strictly; a pickled or copied model
    saves them too; recording the structure of a LoRA-wrapped model (the expert-dropping callback does, mid-training)
    names no kept linear."""
    import copy
    import pickle

    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from optimum_prune.adapters import get_adapter
    from optimum_prune.structure.loading import record_structure

    def saved(model, name):
        model.save_pretrained(tmp_path / name)
        return load_file(tmp_path / name / "model.safetensors")

    model = tiny_model(num_hidden_layers=4)
    prune(model, PruningConfig(method="sublayers", sparsity=0.2, method_options={"sublayers": "attention"}), calibration=token_windows())
    tensors = saved(model, "pruned")
    stand_ins = {name for name, tensor in tensors.items() if tensor.numel() == 1}
    assert stand_ins and all(".self_attn." in name or ".input_layernorm." in name for name in stand_ins)  # removed blocks
    assert set(model.state_dict()) == set(tensors) - stand_ins == set(get_model_state_dict(model))
    model.load_state_dict(tensors)
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        torch.nn.init.ones_(other.lm_head.weight)
        copied = saved(other, "copy")
        assert copied.keys() == tensors.keys() and bool(copied["lm_head.weight"].eq(1).all())  # the copy's own weights
        assert not bool(model.lm_head.weight.eq(1).all())

    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    record_structure(get_adapter(wrapped))
    assert {name for name, tensor in saved(wrapped.base_model.model, "wrapped").items() if tensor.numel() == 1} == stand_ins
    assert saved(wrapped.merge_and_unload(), "merged").keys() == tensors.keys()


def test_a_dropped_non_uniform_model_is_freed_at_once(tmp_path):
    """Its save_pretrained (writing the stand-ins) held the model that holds it: each dropped model (a notebook's
    reloads, a study's points) stayed in memory until a full garbage collection."""
    import gc
    import weakref

    model = tiny_model(num_hidden_layers=4)
    prune(model, PruningConfig(method="sublayers", sparsity=0.2, method_options={"sublayers": "attention"}), calibration=token_windows())
    save_pruned(model, tmp_path / "pruned")
    models = [weakref.ref(model), weakref.ref(AutoModelForCausalLM.from_pretrained(tmp_path / "pruned"))]
    gc.disable()
    try:
        del model
        assert [reference() for reference in models] == [None, None]
    finally:
        gc.enable()


def test_a_non_uniform_model_with_offloaded_modules_saves_without_stand_ins(tmp_path, caplog):
    """save_pretrained gathers an offloaded model's weights module by module, which stand-in tensors have none of."""
    import logging

    model = tiny_model(num_hidden_layers=4)
    prune(model, PruningConfig(method="sublayers", sparsity=0.2, method_options={"sublayers": "attention"}), calibration=token_windows())
    save_pruned(model, tmp_path / "pruned")
    placement = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
                 "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", device_map=placement, offload_folder=tmp_path / "offload")
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        save_pruned(offloaded, tmp_path / "again")
    assert "saved without stand-in tensors" in caplog.text
    assert_reloads_exactly(model, tmp_path / "again")


def test_non_uniform_result_takes_a_lora_adapter_and_resaves(non_uniform, tmp_path):
    _, output = non_uniform
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    peft_model = get_peft_model(reloaded, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    ids = token_windows(samples=2, seq_len=16)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora_b)

    resaved = save_pruned(AutoModelForCausalLM.from_pretrained(output).half(), tmp_path / "resaved")
    again = AutoModelForCausalLM.from_pretrained(resaved, dtype="auto")
    assert again.dtype == torch.float16
    assert json.loads((resaved / "config.json").read_text())["quantization_config"] == json.loads((output / "config.json").read_text())["quantization_config"]


def test_a_pruned_checkpoint_in_a_subfolder_beside_a_dense_one_loads(non_uniform, tmp_path):
    """The check that stand-ins are stored as such read the dense model's weights at the repository's root."""
    import copy
    import shutil

    model, output = non_uniform
    dense = copy.deepcopy(model.config)
    del dense.quantization_config
    type(model)(dense).save_pretrained(tmp_path / "repo")
    shutil.copytree(output, tmp_path / "repo" / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "repo", subfolder="pruned")
    ids = token_windows(samples=1, seq_len=8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda layers: layers.pop(), "describes 3 decoder layers but num_hidden_layers is 4"),
        (lambda layers: layers[0].pop("intermediate_size"), r"layers\[0\].*misses \['intermediate_size'\]"),
        (lambda layers: layers[1].update(num_attention_heads=3, num_key_value_heads=2), "cannot share 2 key/value heads evenly"),
        (lambda layers: layers[0].update(num_attention_heads=4.0), r"layers\[0\]: num_attention_heads must be an integer, got 4.0"),
        (lambda layers: layers.__setitem__(0, 5), r"layers\[0\]: a layer shape is a mapping of sizes, got 5"),
        (lambda layers: layers[0].update(num_attention_heads=64, num_key_value_heads=64), r"layers\[0\] makes self_attn.q_proj.weight \[\d+, \d+\], larger than the config's"),
        (lambda layers: layers[0].update(low_rank={"mlp.down_proj": 10**7}), "low_rank gives mlp.down_proj .* rank 10000000, above its full rank"),
        (lambda layers: layers[0].update(low_rank={"../x": 2}), "low_rank names '../x', which is not a linear of this layer"),
        (  # an MoE structure recorded on a dense layer
            lambda layers: layers[0].update(mpo={"w1": {"rows": [2] * 5, "columns": [2] * 5, "central_bonds": [2, 2]}}),
            r"mpo names expert linears \['w1'\] in a layer without experts",
        ),
        (  # the stored attention was silently dropped as if it were a removed one's stand-in
            lambda layers: next(layer for layer in layers if layer["num_attention_heads"]).update(num_attention_heads=0, num_key_value_heads=0),
            r"quantization_config gives the layers shapes without model.layers.\d+.\S+, but model.safetensors stores it in full",
        ),
    ],
)
def test_corrupt_shapes_fail_clearly(non_uniform, corrupt, message):
    _, output = non_uniform
    config = json.loads((output / "config.json").read_text())
    corrupt(config["quantization_config"]["layers"])
    (output / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(output)


def test_per_layer_widths_reload_with_flaps_output_projection_biases(tmp_path):
    """FLAP's o_proj / down_proj biases on a non-uniform result: a reload that built the stock (bias-free) o_proj
    dropped the saved bias as an unexpected key and only warned."""
    model = tiny_model(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
    options = {"criterion": "flap", "head_mode": "query", "ranking": "global", "components": "attention"}
    prune(model, PruningConfig(method="width", sparsity=0.15, method_options=options), calibration=token_windows())
    assert model.config.quantization_config is not None
    assert any(layer.self_attn.o_proj.bias is not None for layer in model.model.layers)
    assert_reloads_exactly(model, save_pruned(model, tmp_path / "pruned"))


def test_per_layer_query_heads_per_group_reload_and_run_with_a_padding_mask(tmp_path):
    """A padding mask makes SDPA repeat keys/values by the layer's num_key_value_groups (no enable_gqa)."""
    model = tiny_model(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
    options = {"criterion": "magnitude_l2", "head_mode": "query", "ranking": "global", "components": "attention"}
    prune(model, PruningConfig(method="width", sparsity=0.15, method_options=options))
    groups = {layer.self_attn.num_key_value_groups for layer in model.model.layers}
    assert len(groups) > 1 or groups != {4}
    reloaded = AutoModelForCausalLM.from_pretrained(save_pruned(model, tmp_path / "pruned")).eval()
    assert [layer.self_attn.num_key_value_groups for layer in reloaded.model.layers] == [
        layer.self_attn.num_key_value_groups for layer in model.model.layers
    ]
    ids = token_windows(samples=2, seq_len=10, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_a_meta_model_is_built_without_switching_what_other_threads_build():
    """keep_stand_ins built its stock model under transformers' no_init_weights (a process-wide flag): two structured
    prunes in two threads could leave it off, every model built after skipping its initialisation."""
    import threading

    import transformers.modeling_utils as modeling_utils

    from optimum_prune.structure.loading import built_without_weights

    inside, release, seen = threading.Event(), threading.Event(), {}

    def build():
        model = tiny_model()
        inside.set()
        release.wait(10)
        return model

    thread = threading.Thread(target=lambda: seen.update(model=built_without_weights(build)))
    thread.start()
    inside.wait(10)
    try:
        assert modeling_utils._init_weights is True
        assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
    finally:
        release.set()
        thread.join()
    assert next(seen["model"].parameters()).device.type == "meta"
    assert modeling_utils._init_weights is True
