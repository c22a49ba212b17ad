"""What a PruningReport says: the lines users read after each run, and its warnings."""

import logging
import os

import pytest
import torch

from optimum_prune import PruningConfig, prune
from optimum_prune.report import LinearReport, PruningReport, process_peak_rss
from optimum_prune.structure.shapes import LayerShape

from .conftest import tiny_model, token_windows


def test_a_text_only_report_names_no_images():
    report = prune(tiny_model(), PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows(2, 8))
    assert report.calibration_tokens and "images" not in str(report)


def test_the_peak_rss_is_at_least_the_resident_memory_now():
    """The kernel's kB are KiB: read as 1000 bytes, the peak was 2.3 % low."""
    ballast = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched: the peak is (about) now
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert process_peak_rss() >= resident
    del ballast


def test_the_structured_report_gives_what_is_kept_as_a_fraction_of_before():
    report = PruningReport(
        method="layers", sparsity=0.25, allocation="uniform", device="cpu", calibration_tokens=0, parameters_before=1000,
        parameters_after=750, macs_per_token_before=400, macs_per_token_after=300, shapes=[LayerShape(4, 2, 128)],
    )  # fmt: skip
    assert "parameters: 1,000 -> 750 (75.0%)" in str(report) and "MACs per token: 400 -> 300 (75.0%)" in str(report)


@pytest.mark.parametrize(("policy", "said"), [("magnitude", "pruned by magnitude"), ("dense", "left dense")])
def test_the_report_says_what_was_done_with_unrouted_experts(policy, said):
    report = PruningReport(
        method="wanda", sparsity=0.5, allocation="uniform", device="cpu", calibration_tokens=4,
        linears=[LinearReport("model.layers.0.mlp.experts.3.w1", 0, 0.5, 0.5, 16)],
    )  # fmt: skip
    report.record_unrouted(["model.layers.0.mlp.experts.3.w1"], policy)
    assert f"1 expert linears got no calibration token ({said})" in str(report)


def test_zeros_revived_in_a_single_linear_are_warned_of(caplog):
    report = PruningReport(method="sparsegpt", sparsity=0.5, allocation="uniform", device="cpu", calibration_tokens=4)
    report.revived_zeros = {"model.layers.0.self_attn.q_proj": 7}
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        report.warn_revived_zeros()
    assert "made 7 of its zeros non-zero again in 1 linears" in caplog.text


def test_the_request_shows_a_legal_sparsity_neither_as_1_nor_as_minus_0():
    """Sparsity lies in [0, 1): 0.99995 was printed "magnitude 1" (:.4g), and "-0" was kept as -0.0 and printed "-0"."""
    assert prune(tiny_model(), PruningConfig(method="magnitude", sparsity=0.99995)).request == "magnitude 0.99995 (uniform)"
    config = PruningConfig(method="magnitude", sparsity="-0")
    assert '"sparsity": 0.0' in config.to_json_string()
    assert prune(tiny_model(), config).request == "magnitude 0 (uniform)"


def test_unrouted_experts_are_counted_in_one_short_line():
    """Every unrouted linear was listed on one line: 407,088 characters for a 48-layer, 64-expert model."""
    names = [f"model.layers.{layer}.mlp.experts.{expert}.w{w}" for layer in range(48) for expert in range(64) for w in (1, 2, 3)]
    report = PruningReport(method="wanda", sparsity=0.5, allocation="uniform", device="cpu", calibration_tokens=4)
    report.record_unrouted(names, "magnitude")
    assert max(map(len, str(report).splitlines())) < 300
    assert f"{len(names)} expert linears got no calibration token (pruned by magnitude), e.g. {names[0]}" in str(report)


def test_the_structure_table_groups_alike_layers_and_shows_what_changed(tmp_path):
    """One row per layer (1,606 lines for low_rank on 200 layers), and only heads / kv / mlp columns: the experts a
    global ranking kept per layer, SliceGPT's residual widths and low-rank factors were not in the table."""
    shapes = [LayerShape(4, 2, 96, num_experts=5), LayerShape(4, 2, 96, num_experts=3), LayerShape(4, 2, 96, num_experts=3)]
    report = PruningReport(method="experts", sparsity=0.5, allocation="uniform", device="cpu", calibration_tokens=4, shapes=shapes)
    table = str(report).splitlines()[1:4]
    assert table[0].split() == ["layers", "heads", "kv", "mlp", "experts"]
    assert table[1].split() == ["0", "4", "2", "96", "5"] and table[2].split() == ["1-2", "4", "2", "96", "3"]
    report.shapes = [LayerShape(4, 2, 128, residual_widths=(64, 48, 48))] * 30
    report.removed = [f"model.layers.{index} attention: query heads [0]" for index in range(30)]
    text = str(report)
    assert "residual in/mid/out" in text and "   0-29      4    2     128             64/48/48" in text
    assert text.count("removed:") == 11 and "removed: ... 20 more (PruningReport.removed lists them)" in text


def test_a_structured_report_states_what_its_decoder_layers_kept():
    """Whole-model parameters (embeddings included) were the only count: width 0.3 read as 20.9 % removed when the
    decoder layers, which its sparsity counts, lost 28.7 %."""
    model = tiny_model()
    report = prune(model, PruningConfig(method="width", sparsity=0.3), calibration=token_windows(4, 16))
    kept = sum(p.numel() for layer in model.model.layers for p in layer.parameters())
    assert report.decoder_parameters_after == kept < report.decoder_parameters_before
    assert f"decoder layers' parameters: {report.decoder_parameters_before:,} -> {kept:,}" in str(report)


def test_low_rank_says_the_rank_it_kept():
    report = prune(tiny_model(), PruningConfig(method="low_rank", sparsity=0.3), calibration=token_windows(4, 16))
    assert all(": factorised, kept rank " in item for item in report.removed)


def test_a_report_is_a_json_ready_dict_with_its_measured_sparsities():
    import json

    report = prune(tiny_model(), PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows(4, 16))
    stored = json.loads(json.dumps(report.to_dict()))
    assert stored["overall_sparsity"] == pytest.approx(report.overall_sparsity) and stored["part_sparsity"] == {"language": pytest.approx(report.part_sparsity("language"))}
    assert stored["request"] == "wanda 0.5 (uniform)" and len(stored["linears"]) == len(report.linears)
    structured = prune(tiny_model(), PruningConfig(method="width", sparsity=0.25), calibration=token_windows(4, 16))
    stored = json.loads(json.dumps(structured.to_dict()))
    assert stored["shapes"][0]["num_attention_heads"] == structured.shapes[0].num_attention_heads
    assert stored["overall_sparsity"] is None  # it pruned no linear: 0.0 read as "the model is dense" on a sparse one


def test_a_part_that_is_no_model_part_is_named_not_read_as_left_dense():
    report = prune(tiny_model(), PruningConfig(method="magnitude", sparsity=0.5))
    assert report.part_sparsity("vision") == 0.0 and report.layer_sparsities("vision") == {}  # a part left dense
    with pytest.raises(ValueError, match="part 'languge' is no model part; parts: vision, projector, language"):
        report.part_sparsity("languge")  # was 0.0, as if nothing had been pruned
    with pytest.raises(ValueError, match="part 'languge'"):
        report.layer_sparsities("languge")  # was {}


def test_sizes_a_weight_zeroing_step_did_not_measure_are_null_not_zero():
    """pruning_report.json said a magnitude-pruned model had 0 parameters and 0 MACs per token."""
    data = prune(tiny_model(), PruningConfig(method="magnitude", sparsity=0.5)).to_dict()
    sizes = ("parameters_before", "parameters_after", "decoder_parameters_before", "decoder_parameters_after", "macs_per_token_before", "macs_per_token_after")
    assert all(data[key] is None for key in sizes)
    structured = prune(tiny_model(), PruningConfig(method="width", sparsity=0.25), calibration=token_windows(4, 16)).to_dict()
    assert all(structured[key] > 0 for key in sizes)


def test_the_structure_table_shows_rerouted_sublayers():
    """A layer whose MLP a linear map replaced read 0 heads, 0 channels: an empty layer, against the MACs below it."""
    model = tiny_model(num_hidden_layers=4)
    config = PruningConfig(method="layers", sparsity=0.25, method_options={"reroute": True}, num_calibration_samples=8, calibration_seq_len=32)
    report = prune(model, config, calibration=token_windows(8, 32))
    rerouted = [index for index, shape in enumerate(report.shapes) if shape.rerouted]
    assert rerouted and "rerouted" in str(report)
    row = next(line for line in str(report).splitlines() if line.split()[:1] == [str(rerouted[0])])
    assert row.split()[-1] == ",".join(report.shapes[rerouted[0]].rerouted)
