"""optimum_prune.study: grid checking, resumable sweeps, the Pareto front and the report."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest
import torch

from optimum_prune.study import StudyGrid, best_within, pareto_front, run_study, write_outputs
from optimum_prune.study import runner as study_runner
from optimum_prune.study.grid import Protocol, StudyPoint
from optimum_prune.study.outputs import _csv, report
from optimum_prune.study.runner import StudyResults, StudyRow


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


def test_owl_with_a_pattern_is_refused_before_anything_runs(model_dir):
    with pytest.raises(ValueError, match=r"grid.pruning\[0\] \(sparsity=2:4, allocation=owl\)"):
        StudyGrid.from_dict(small_grid(model_dir, pruning=[{"method": "wanda", "sweep": {"sparsity": ["2:4"], "allocation": ["owl"]}}]))


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
    results = run_study(grid, tmp_path, device="cpu")
    write_outputs(results, tmp_path, "test")
    assert "the largest checkpoint" in (tmp_path / "REPORT.md").read_text()


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


def test_sparse_format_bytes_counts_a_bitmap_and_the_kept_values():
    from optimum_prune.study.measure import sparse_format_bytes

    half = {"numel": 800, "zeros": 400}
    assert sparse_format_bytes(1000, [half], bits=8) == 1000 - (800 - (100 + 400))
    assert sparse_format_bytes(1000, [{"numel": 800, "zeros": 0}], bits=8) == 1000  # dense is cheaper: kept dense
    assert sparse_format_bytes(5000, [half, half], bits=32) == 5000 - 2 * (3200 - (100 + 1600))


def test_asking_for_latency_remeasures_points_cached_without_it(model_dir, tmp_path):
    grid = small_grid(model_dir, pruning=["none"], quantization=["none"])
    run_study(StudyGrid.from_dict(grid), tmp_path, device="cpu")
    timed = run_study(StudyGrid.from_dict({**grid, "latency": "cpu"}), tmp_path, device="cpu")
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
    write_outputs(run_study(grid, tmp_path, device="cpu"), tmp_path, "test")
    assert "No point could be measured:" in (tmp_path / "REPORT.md").read_text()

    def no_matplotlib(*_args):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(outputs, "plot_pareto", no_matplotlib)
    grid = StudyGrid.from_dict(small_grid(model_dir, pruning=["none"], quantization=["none"]))
    write_outputs(run_study(grid, tmp_path / "plain", device="cpu"), tmp_path / "plain", "test")
    assert "| dense |" in (tmp_path / "plain" / "REPORT.md").read_text() and not (tmp_path / "plain" / "pareto.png").exists()


def test_latency_columns_come_from_this_run_and_its_device(model_dir, tmp_path):
    """A point timed earlier is not shown against one that was not, nor reused for another device."""
    grid = small_grid(model_dir, pruning=["none", {"method": "magnitude", "sweep": {"sparsity": [0.5]}}], quantization=["none"])
    run_study(StudyGrid.from_dict({**grid, "pruning": ["none"], "latency": "cpu"}), tmp_path, device="cpu")
    untimed = run_study(StudyGrid.from_dict(grid), tmp_path, device="cpu")  # the dense point still holds a latency
    write_outputs(untimed, tmp_path, "test")
    assert "latency ms" not in (tmp_path / "REPORT.md").read_text()
    cached, moved = tmp_path / "points", 0
    for path in cached.glob("*.json"):
        record = json.loads(path.read_text())
        if "latency_device" in record["result"]:
            record["result"]["latency_device"] = "NVIDIA H200"  # as if timed on another machine
            path.write_text(json.dumps(record))
            moved += 1
    assert moved == 1  # the dense point's latency, kept from the first run
    assert run_study(StudyGrid.from_dict({**grid, "latency": "cpu"}), tmp_path, device="cpu").measured_now == 2


def test_points_cached_with_other_software_are_named_in_the_report(model_dir, tmp_path):
    grid = StudyGrid.from_dict(small_grid(model_dir, pruning=["none", {"method": "magnitude", "sweep": {"sparsity": [0.5]}}], quantization=["none"]))
    first = run_study(grid, tmp_path, device="cpu")
    assert all(row.result["versions"]["torch"] == torch.__version__ for row in first.rows)
    write_outputs(first, tmp_path, "test")
    assert "other software" not in (tmp_path / "REPORT.md").read_text()
    for path in (tmp_path / "points").glob("*.json"):
        record = json.loads(path.read_text())
        if record["pruning"] is None:
            record["result"]["versions"]["torch"] = "2.0.0"  # as if measured before an upgrade
        else:
            del record["result"]["versions"]  # as cached by a version that kept no record
        path.write_text(json.dumps(record))
    resumed = run_study(grid, tmp_path, device="cpu")
    assert resumed.measured_now == 0
    write_outputs(resumed, tmp_path, "test")
    report = (tmp_path / "REPORT.md").read_text()
    assert "- dense: torch 2.0.0" in report and "- magnitude sparsity=0.5: not recorded" in report


def test_the_committed_study_finds_every_point_it_measured():
    """A point's cache key is its full config, so an option added to a method re-keys the committed points and a
    rerun of examples/study/grid.yaml would measure them again. When the new option's default is what they ran,
    move their files to the new keys (their configs as this version reads them) instead."""
    from pathlib import Path

    from optimum_prune.study.outputs import software_versions

    study = Path(__file__).resolve().parents[1] / "examples" / "study"
    grid = StudyGrid.from_yaml(study / "grid.yaml")
    uncached = [
        point.label for point in grid.points
        if study_runner._cached(study / "grid" / "points" / f"{point.key(grid.protocol)}.json", point, None, software_versions()) is None
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
    path.write_text(json.dumps({"pruning": None, "quantization": None, "result": {"error": "x", "versions": {"torch": "1"}}}))
    assert study_runner._cached(path, point, None, software) is None
    path.write_text(json.dumps({"pruning": None, "quantization": None, "result": {"error": "x", "versions": software}}))
    assert study_runner._cached(path, point, None, software) == {"error": "x", "versions": software}
    path.write_text(json.dumps({"pruning": None, "quantization": None, "result": {"perplexity": 1.0}}))
    assert study_runner._cached(path, point, None, software) is None


def test_the_redundancy_cache_is_per_protocol(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study_runner, "layer_redundancy", lambda protocol, device: calls.append(protocol) or {"seed": protocol.seed})
    assert study_runner._redundancy(Protocol(seed=1), tmp_path, "cpu") == {"seed": 1}
    assert study_runner._redundancy(Protocol(seed=2), tmp_path, "cpu") == {"seed": 2}
    assert study_runner._redundancy(Protocol(seed=1), tmp_path, "cpu") == {"seed": 1} and len(calls) == 2
