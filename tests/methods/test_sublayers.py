import copy

import pytest
import torch

from optimum_prune import PruningConfig, prune

from ..conftest import tiny_model, token_windows


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("criterion", ["block_influence", "perplexity"])
def test_removed_sublayers_leave_the_residual_path(criterion, family):
    dense = tiny_model(family, num_hidden_layers=4)
    model = copy.deepcopy(dense)
    report = prune(model, PruningConfig(method="sublayers", sparsity=0.3, method_options={"criterion": criterion}), calibration=token_windows())

    assert report.removed and set(report.layer_scores) == {f"{criterion} (attention)", f"{criterion} (mlp)"}
    reference = copy.deepcopy(dense)
    with torch.no_grad():
        for item in report.removed:
            name, kind = item.split()
            layer = reference.model.layers[int(name.rsplit(".", 1)[1])]
            (layer.self_attn.o_proj if kind == "attention" else layer.mlp.down_proj).weight.zero_()
        ids = token_windows(samples=2, seq_len=16, seed=3)
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    removed_parameters = report.parameters_before - report.parameters_after
    linears = sum(l.weight.numel() for layer in dense.model.layers for l in layer.modules() if isinstance(l, torch.nn.Linear))
    assert removed_parameters <= 0.3 * linears + 4 * 64  # within budget (norm weights of removed blocks go too)


@pytest.mark.parametrize("reroute", [False, True])
def test_blocks_go_in_score_order_while_they_fit_the_budget(reroute):
    """Lowest score first; a block that does not fit is skipped and the next tried (stopping there removed less), and
    with reroute=True each block costs its linears less the map left in its place (h² + h)."""
    model = tiny_model(num_hidden_layers=4)
    blocks = {
        (index, kind): sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
        for index, layer in enumerate(model.model.layers) for kind, block in (("attention", layer.self_attn), ("mlp", layer.mlp))
    }  # fmt: skip
    hidden = model.config.hidden_size
    costs = {unit: size - (hidden * hidden + hidden if reroute else 0) for unit, size in blocks.items()}
    budget = 0.3 * sum(blocks.values())
    options = {"reroute": reroute}
    report = prune(model, PruningConfig(method="sublayers", sparsity=0.3, method_options=options), calibration=token_windows())
    scores = {(index, kind): report.layer_scores[f"block_influence ({kind})"][index] for index, kind in blocks}
    expected, spent = [], 0
    for unit in sorted(scores, key=scores.get):
        if spent + costs[unit] <= budget:
            expected.append(unit)
            spent += costs[unit]
    assert report.removed == [f"model.layers.{index} {kind}" for index, kind in sorted(expected)]
    assert len(expected) >= 2  # more than the first block that fits


def test_only_attention_blocks():
    model = tiny_model(num_hidden_layers=4)
    report = prune(model, PruningConfig(method="sublayers", sparsity=0.1, method_options={"sublayers": "attention"}), calibration=token_windows())
    assert report.removed and all(item.endswith(" attention") for item in report.removed)
    assert model.config.quantization_config.layers  # non-uniform: shapes recorded for reloading


def test_budget_below_one_block_is_an_error():
    with pytest.raises(ValueError, match="smaller than the smallest removable block"):
        prune(tiny_model(), PruningConfig(method="sublayers", sparsity=0.01), calibration=token_windows())


def test_ignoring_every_block_is_an_error_naming_ignore():
    config = PruningConfig(method="sublayers", sparsity=0.3, ignore=["*.mlp*"], method_options={"sublayers": "mlp"})
    with pytest.raises(ValueError, match=r"PruningConfig.ignore .* leave no mlp block"):
        prune(tiny_model(), config, calibration=token_windows())


@pytest.mark.parametrize("family", ["llama", "gemma3", "stablelm"])  # StableLM builds its causal mask from the cache itself
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_removed_first_attention_keeps_the_caches_length_for_positions_and_padding(cache, family):
    """transformers reads the tokens already seen from layer 0's cache: generating with it must equal
    the full forward, and a left-padded batch must generate as each prompt alone."""
    from transformers import StaticCache

    from optimum_prune import get_adapter

    model = tiny_model(family)
    get_adapter(model).remove_sublayer(model.model.layers[0], "attention")
    ids = token_windows(samples=2, seq_len=10, seed=4)

    def new_cache():
        return StaticCache(config=model.config, max_cache_len=32) if cache == "static" else None

    with torch.no_grad():
        full = model(ids).logits[:, -1]
        prefix = model(ids[:, :-1], past_key_values=new_cache(), use_cache=True)
        assert prefix.past_key_values.get_seq_length() == 9
        step = model(ids[:, -1:], past_key_values=prefix.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)

    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids[:1, :6]], dim=1)
    batch = torch.cat([padded, ids[1:, :10]])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 6)], dim=1), torch.ones(1, 10)]).long()
    generated = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    alone = model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[0, 4:], alone[0])


def test_a_removed_attention_keeps_each_layers_attention_map_in_place_and_a_quantized_cache_running(tmp_path):
    """Its stand-in was no instance of the stock class, so output_attentions dropped its entry (later layers moved
    up an index), and its one-channel cache entry could not be split into a quantized cache's channel groups."""
    pytest.importorskip("optimum.quanto")
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaAttention

    from optimum_prune import get_adapter, save_pruned

    model = tiny_model(num_hidden_layers=3, head_dim=32, attn_implementation="eager")
    for index, how in ((0, "remove"), (2, "reroute")):
        getattr(get_adapter(model), f"{how}_sublayer")(model.model.layers[index], "attention")
    assert all(isinstance(layer.self_attn, LlamaAttention) for layer in model.model.layers)
    ids = token_windows(samples=1, seq_len=6, seed=1)
    with torch.no_grad():
        maps = [weights.shape for weights in model(ids, output_attentions=True).attentions]
    heads = model.config.num_attention_heads
    assert maps == [(1, 0, 6, 6), (1, heads, 6, 6), (1, 0, 6, 6)]
    model.set_attn_implementation("sdpa")  # whose layers return no maps: neither do the stand-ins
    with torch.no_grad():
        assert not model(ids, output_attentions=True).attentions
    model.set_attn_implementation("eager")
    quantized = {"backend": "quanto", "nbits": 4, "q_group_size": 32, "residual_length": 2}
    greedy = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    plain = model.generate(ids, **greedy)
    assert torch.equal(model.generate(ids, cache_implementation="quantized", cache_config=quantized, **greedy)[:, :8], plain[:, :8])
    pruned = tiny_model(num_hidden_layers=4, attn_implementation="eager")
    report = prune(pruned, PruningConfig(method="sublayers", sparsity=0.1, method_options={"sublayers": "attention"}), calibration=token_windows())
    reloaded = AutoModelForCausalLM.from_pretrained(save_pruned(pruned, tmp_path / "removed"), attn_implementation="eager")
    with torch.no_grad():
        assert [w.shape[1] for w in reloaded(ids, output_attentions=True).attentions] == [
            0 if f"model.layers.{index} attention" in report.removed else heads for index in range(4)
        ]


def test_a_model_with_stand_ins_unpickles_in_a_fresh_process(tmp_path):
    """The stand-ins' classes (RemovedLlamaAttention, ShortcutLlamaDecoderLayer) exist once made in a process: a
    torch.save(model) could not be loaded anywhere else."""
    import subprocess
    import sys

    from optimum_prune import get_adapter

    model = tiny_model(num_hidden_layers=3)
    adapter = get_adapter(model)
    adapter.remove_sublayer(model.model.layers[0], "attention")
    adapter.add_shortcuts(1)
    torch.save(model, tmp_path / "model.pt")
    script = (
        f"import torch; model = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False); "
        "print(*(type(layer).__name__ + '/' + type(layer.self_attn).__name__ for layer in model.model.layers))"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["LlamaDecoderLayer/RemovedLlamaAttention", "ShortcutLlamaDecoderLayer/LlamaAttention", "LlamaDecoderLayer/LlamaAttention"]


def test_of_equally_scored_blocks_the_larger_goes_first():
    """Layers 1 and 2 are identities (all four blocks score alike): taken in position order, layer 2's MLP no longer
    fitted and a live attention block went in its place."""
    model = tiny_model(num_hidden_layers=5)
    with torch.no_grad():
        for index in (1, 2):
            model.model.layers[index].self_attn.o_proj.weight.zero_()
            model.model.layers[index].mlp.down_proj.weight.zero_()
    dense, windows = copy.deepcopy(model), token_windows(samples=4, seq_len=32)
    report = prune(model, PruningConfig(method="sublayers", sparsity=0.35), calibration=windows)
    assert sorted(report.removed) == ["model.layers.1 attention", "model.layers.1 mlp", "model.layers.2 mlp"]
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, dense(windows).logits)


def test_the_perplexity_criterion_shows_its_progress(capsys):
    prune(tiny_model(), PruningConfig(method="sublayers", sparsity=0.2, method_options={"criterion": "perplexity"}), calibration=token_windows())
    assert "Perplexity without each sublayer" in capsys.readouterr().err
