"""prune_checkpoint: layers pruned from disk one at a time equal the in-memory run, and resume."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optimum_prune import PruningConfig, prune, prune_checkpoint, verify_sparsity
from optimum_prune import atomic_files, streaming
from optimum_prune.calibration import engine
from optimum_prune.cli import main
from optimum_prune.models import load_tokenizer
from optimum_prune.streaming import CheckpointReader, LayerStream

from .adapters.test_moe import tiny_moe
from .conftest import owner_only, tiny_model, token_windows

CONFIGS = {
    "wanda": PruningConfig(method="wanda", sparsity=0.5),
    "sparsegpt 2:4": PruningConfig(method="sparsegpt", sparsity="2:4"),
    "magnitude": PruningConfig(method="magnitude", sparsity=0.4),
    "wanda owl": PruningConfig(method="wanda", sparsity=0.6, allocation="owl"),
}


@pytest.fixture
def sharded(tmp_path, bpe_tokenizer):
    """A tiny Llama saved in several safetensors shards, with its tokenizer."""
    directory = tmp_path / "source"
    tiny_model().save_pretrained(directory, max_shard_size="60KB")
    bpe_tokenizer.save_pretrained(directory)
    assert len(list(directory.glob("*.safetensors"))) > 2
    return directory


def pruned_in_memory(source, config, windows) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(source)
    prune(model, config, calibration=windows)
    return model.state_dict()


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_offloaded_run_equals_the_in_memory_run(sharded, tmp_path, name):
    windows = token_windows()
    report = prune_checkpoint(sharded, tmp_path / "out", CONFIGS[name], calibration=windows)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # stock transformers
    assert_same_weights(reloaded.state_dict(), pruned_in_memory(sharded, CONFIGS[name], windows))
    assert len(report.linears) == 3 * 7
    assert report.overall_sparsity == pytest.approx(verify_sparsity(reloaded)["overall_sparsity"], abs=1e-6)
    assert reloaded.config.pruning_config["method"] == CONFIGS[name].method
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "out" / "pruning_report.json").read_text())["overall_sparsity"] == pytest.approx(report.overall_sparsity)
    assert not list(tmp_path.glob(".out.*"))  # no staging left behind


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_offloaded_equals_the_in_memory_run(family, tmp_path, bpe_tokenizer):
    """Gemma 3's decoder is ``model.model`` of a model whose base_model_prefix is empty, with a second rotary embedding."""
    source = tmp_path / "source"
    tiny_model(family).save_pretrained(source, max_shard_size="60KB")
    bpe_tokenizer.save_pretrained(source)
    windows = token_windows()
    prune_checkpoint(source, tmp_path / "out", CONFIGS["wanda owl"], calibration=windows)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_same_weights(reloaded.state_dict(), pruned_in_memory(source, CONFIGS["wanda owl"], windows))


def test_layers_and_activations_both_on_disk_equal_the_in_memory_run(sharded, tmp_path):
    """The 70B-on-a-small-machine set-up: weights read layer by layer, activations in temporary files."""
    windows = token_windows()
    prune_checkpoint(sharded, tmp_path / "out", CONFIGS["wanda owl"], calibration=windows, activation_device="disk")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_same_weights(reloaded.state_dict(), pruned_in_memory(sharded, CONFIGS["wanda owl"], windows))


def test_only_one_decoder_layer_is_ever_materialised(sharded, tmp_path, monkeypatch):
    loaded, resident_before = [], []
    original = LayerStream._load

    def load(self, layer, prefix, tensors):
        resident_before.append(sum(not next(other.parameters()).is_meta for other in loaded))
        loaded.append(layer)
        original(self, layer, prefix, tensors)

    monkeypatch.setattr(LayerStream, "_load", load)
    prune_checkpoint(sharded, tmp_path / "out", CONFIGS["wanda owl"], calibration=token_windows())
    assert len(loaded) == 6 and resident_before == [0] * 6  # OWL's pass and the pruning pass, one layer at a time
    assert all(next(layer.parameters()).is_meta for layer in loaded)


def _killed_while_saving(sharded, tmp_path, monkeypatch, layer: int, config, **kwargs) -> None:
    """Run prune_checkpoint into tmp_path/out and kill it as it saves decoder layer ``layer``."""
    original = LayerStream._save

    def dying_save(self, index, layer_module, prefix):
        if index == layer:
            raise KeyboardInterrupt("killed")
        original(self, index, layer_module, prefix)

    monkeypatch.setattr(LayerStream, "_save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoint(sharded, tmp_path / "out", config, **kwargs)
    monkeypatch.setattr(LayerStream, "_save", original)


def test_resume_after_a_kill_gives_the_uninterrupted_checkpoint(sharded, tmp_path, monkeypatch):
    windows, config = token_windows(), CONFIGS["sparsegpt 2:4"]
    _killed_while_saving(sharded, tmp_path, monkeypatch, 2, config, calibration=windows)
    assert not (tmp_path / "out").exists()  # nothing that looks like a checkpoint
    staged = sorted(p.name for p in (tmp_path / ".out.partial").glob("model-layer-*"))
    assert staged == ["model-layer-00000.safetensors", "model-layer-00001.safetensors"]

    original = LayerStream._save
    saved = []
    monkeypatch.setattr(LayerStream, "_save", lambda self, index, *a: saved.append(index) or original(self, index, *a))
    report = prune_checkpoint(sharded, tmp_path / "out", config, calibration=windows)
    assert saved == [2]  # the finished layers are read back, not pruned again
    assert len(report.linears) == 21
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict(), pruned_in_memory(sharded, config, windows))


@pytest.mark.parametrize("damage", ["cut off", "empty"])
def test_a_staged_layer_that_cannot_be_read_is_pruned_again(sharded, tmp_path, monkeypatch, caplog, damage):
    """It failed the resume saying 'save or copy it again' of a file in the partial folder the user never made."""
    windows, config = token_windows(), CONFIGS["wanda"]
    _killed_while_saving(sharded, tmp_path, monkeypatch, 2, config, calibration=windows)
    shard = tmp_path / ".out.partial" / "model-layer-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2] if damage == "cut off" else b"")
    original = LayerStream._save
    saved = []
    monkeypatch.setattr(LayerStream, "_save", lambda self, index, *a: saved.append(index) or original(self, index, *a))
    prune_checkpoint(sharded, tmp_path / "out", config, calibration=windows)
    assert saved == [0, 2] and f"{shard} cannot be read" in caplog.text and "layer 0 is pruned again" in caplog.text
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict(), pruned_in_memory(sharded, config, windows))


def test_a_partial_run_an_earlier_version_recorded_resumes_or_says_why_not(sharded, tmp_path, monkeypatch):
    """An option added since (sparsegpt's keep_zeros) made the same recipe 'another pruning_config'; an older record
    format was said to have 'another source / dtype / calibration'."""
    import json

    windows, config = token_windows(), CONFIGS["sparsegpt 2:4"]
    _killed_while_saving(sharded, tmp_path, monkeypatch, 2, config, calibration=windows)
    record_file = tmp_path / ".out.partial" / "streaming-run.json"
    record = json.loads(record_file.read_text())
    del record["pruning_config"]["method_options"]["keep_zeros"]  # as the version before the option wrote it
    record_file.write_text(json.dumps(record))
    original = LayerStream._save
    saved = []
    monkeypatch.setattr(LayerStream, "_save", lambda self, index, *a: saved.append(index) or original(self, index, *a))
    prune_checkpoint(sharded, tmp_path / "out", config, calibration=windows)
    assert saved == [2]

    _killed_while_saving(sharded, tmp_path, monkeypatch, 2, config, calibration=windows)
    for written, message in (
        ({"source": str(sharded), "pruning_config": record["pruning_config"]}, "an earlier optimum-prune wrote, whose record cannot tell"),
        ([1, 2], "without a readable streaming-run.json"),
    ):
        record_file.write_text(json.dumps(written))
        with pytest.raises(ValueError, match=message):
            prune_checkpoint(sharded, tmp_path / "out", config, calibration=windows)


def test_a_resumed_run_reports_the_finished_layers_as_they_were_pruned(tmp_path, monkeypatch):
    """Finished layers were re-measured from their weights: experts left dense (no calibration token) were counted
    as pruned at the layer's target and dropped from the unrouted list (overall 0.26 for 0.5)."""
    tiny_moe("mixtral", num_local_experts=16, num_experts_per_tok=1, num_hidden_layers=2).save_pretrained(tmp_path / "moe")
    config = PruningConfig(method="wanda", sparsity=0.5, moe_options={"unrouted_experts": "dense"})
    windows = token_windows(2, 4)
    full = prune_checkpoint(tmp_path / "moe", tmp_path / "full", config, calibration=windows)
    _killed_while_saving(tmp_path / "moe", tmp_path, monkeypatch, 1, config, calibration=windows)
    resumed = prune_checkpoint(tmp_path / "moe", tmp_path / "out", config, calibration=windows)
    assert full.unrouted and resumed.unrouted == full.unrouted and resumed.linears == full.linears
    assert resumed.overall_sparsity == full.overall_sparsity


@pytest.mark.parametrize(
    "changed, differing",
    [
        ({"config": CONFIGS["wanda owl"]}, "pruning_config"),
        ({"calibration": token_windows(seed=9)}, "calibration"),
        ({"dtype": torch.bfloat16}, "dtype"),
    ],
)
def test_layers_of_a_partial_run_with_another_config_data_or_dtype_are_not_mixed_in(sharded, tmp_path, monkeypatch, changed, differing):
    first = {"config": CONFIGS["wanda"], "calibration": token_windows()}
    _killed_while_saving(sharded, tmp_path, monkeypatch, 1, first["config"], calibration=first["calibration"])
    second = {**first, **changed}
    with pytest.raises(ValueError, match=f"holds layers of a partial run with another {differing};"):
        prune_checkpoint(sharded, tmp_path / "out", second.pop("config"), **second)


def test_layers_of_a_partial_run_from_a_source_replaced_at_the_same_path_are_not_mixed_in(sharded, tmp_path, monkeypatch, bpe_tokenizer):
    """E.g. another revision downloaded into the same folder: the resumed run mixed both models' layers."""
    config, windows = CONFIGS["wanda"], token_windows()
    _killed_while_saving(sharded, tmp_path, monkeypatch, 1, config, calibration=windows)
    for shard in sharded.glob("*.safetensors"):
        shard.unlink()
    tiny_model(seed=1).save_pretrained(sharded, max_shard_size="60KB")
    with pytest.raises(ValueError, match="holds layers of a partial run with another source;"):
        prune_checkpoint(sharded, tmp_path / "out", config, calibration=windows)


def test_owl_from_disk_keeps_buffers_no_checkpoint_holds(tmp_path):
    """OWL loads each layer twice (statistics, then pruning); Qwen2-MoE's attentions keep their own rotary
    inv_freq (not saved), which the first release sent to meta and the second load could not find."""
    tiny_moe("qwen2_moe").save_pretrained(tmp_path / "moe")
    config, windows = PruningConfig(method="wanda", sparsity=0.6, allocation="owl"), token_windows(2, 8)
    report = prune_checkpoint(tmp_path / "moe", tmp_path / "out", config, calibration=windows)
    in_memory = pruned_in_memory(tmp_path / "moe", config, windows)
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict(), in_memory)
    assert report.overall_sparsity == pytest.approx(0.6, abs=0.02)


def test_processes_started_by_torchrun_are_refused_without_a_process_group(sharded, tmp_path, monkeypatch):
    """Each would write the same partial folder; the CLI refused them, the Python API did not."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="offloaded pruning runs in one process"):
        prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_a_partial_run_without_a_finished_layer_starts_over(sharded, tmp_path, monkeypatch):
    """E.g. a first call refused for a typo: the corrected one must not be told of 'another run'."""
    monkeypatch.setattr(LayerStream, "_save", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    monkeypatch.undo()
    windows = token_windows()
    prune_checkpoint(sharded, tmp_path / "out", CONFIGS["wanda"], calibration=windows)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert_same_weights(reloaded, pruned_in_memory(sharded, CONFIGS["wanda"], windows))
    assert not (tmp_path / ".out.partial").exists() and not (tmp_path / "out" / "streaming-run.json").exists()


def test_a_second_run_into_the_same_output_while_one_runs_is_refused(sharded, tmp_path):
    """Two runs shared the partial folder: each took the other's layer shards as its own, and the output,
    recorded as one config, mixed both runs' layers."""
    import fcntl
    import os

    partial = tmp_path / ".out.partial"
    partial.mkdir()
    running = os.open(partial, os.O_RDONLY)  # another run holds it (a lock is per open folder, so this stands in)
    fcntl.flock(running, fcntl.LOCK_EX)
    try:
        with pytest.raises(ValueError, match="another run is pruning into .*out' now"):
            prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
        assert not any(partial.iterdir())  # its record left as it was
    finally:
        os.close(running)
    prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])  # once that run is over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"]


def test_identical_runs_write_identical_files(sharded, tmp_path):
    """Each layer's report was a second key of its shard's metadata, which safetensors writes in a random order."""
    config, windows = CONFIGS["wanda"], token_windows()
    for name in ("first", "second"):
        prune_checkpoint(sharded, tmp_path / name, config, calibration=windows)
    first, second = ({p.name: p.read_bytes() for p in (tmp_path / name).iterdir()} for name in ("first", "second"))
    for reports in (first, second):  # the run's time and peak memory: measured, not made
        del reports["pruning_report.json"]
    assert first == second
    assert not any(name.startswith("streaming-") for name in first)
    for shard in (tmp_path / "first").glob("*.safetensors"):
        with safe_open(shard, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}  # one key: nothing to order


def test_the_index_states_the_total_size_as_save_pretrained_does(sharded, tmp_path):
    import json

    prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    stored = {name: tensor for name, tensor in model.state_dict().items() if name in index["weight_map"]}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values()) > 0


def test_a_run_whose_final_swap_fails_resumes_from_its_layers(sharded, tmp_path, monkeypatch, caplog):
    """The finished layers had moved to a name the next run does not look at (and a later save would delete)."""
    def busy(finished, target):
        raise OSError(errno.EBUSY, "Device or resource busy", str(target))

    monkeypatch.setattr(streaming, "replace_directory", busy)
    with pytest.raises(OSError, match="busy"):
        prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    monkeypatch.undo()
    assert (tmp_path / ".out.partial").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == [".out.partial", "source"]
    assert (tmp_path / ".out.partial").stat().st_mode & 0o777 == 0o700  # private again, not the output's mode it took
    with caplog.at_level("INFO", logger="optimum_prune"):
        prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    assert "resuming the partial run" in caplog.text and sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"]


def test_a_full_disk_is_said_plainly_leaves_no_partial_shard_and_the_rerun_resumes(sharded, tmp_path, monkeypatch):
    """safetensors reported it as "Error while serializing: I/O error: ... (os error 28)", and its half-written
    shard stayed in the partial folder."""
    from safetensors import SafetensorError

    original, config = streaming.save_file, CONFIGS["magnitude"]

    def full_at_layer_1(tensors, path, metadata=None):
        if "layer-00001" in str(path):
            Path(path).write_bytes(b"half a shard")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        original(tensors, path, metadata=metadata)

    monkeypatch.setattr(streaming, "save_file", full_at_layer_1)
    with pytest.raises(OSError, match="no space left on the disk holding .* it resumes from layer 1 .layers 0-0 are kept") as caught:
        prune_checkpoint(sharded, tmp_path / "out", config)
    assert caught.value.errno == errno.ENOSPC
    assert not getattr(caught.value, "__notes__", None)  # not prune's "load the model again": a rerun resumes
    assert sorted(p.name for p in (tmp_path / ".out.partial").iterdir()) == ["model-layer-00000.safetensors", "streaming-notes.json", "streaming-run.json"]
    monkeypatch.undo()
    prune_checkpoint(sharded, tmp_path / "out", config)
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict(), pruned_in_memory(sharded, config, None))


def test_a_disk_without_room_for_the_output_is_warned_of_before_pruning(sharded, tmp_path, monkeypatch, caplog):
    needed = CheckpointReader(sharded).stored_size(torch.float32)
    assert needed == sum(t.numel() * 4 for t in AutoModelForCausalLM.from_pretrained(sharded).state_dict().values())
    monkeypatch.setattr(streaming.shutil, "disk_usage", lambda path: SimpleNamespace(free=needed // 2))
    with caplog.at_level("WARNING", logger="optimum_prune"):
        prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    assert "the pruned checkpoint needs about" in caplog.text and "Free space first" in caplog.text
    caplog.clear()
    monkeypatch.setattr(streaming.shutil, "disk_usage", lambda path: SimpleNamespace(free=needed))
    with caplog.at_level("WARNING", logger="optimum_prune"):
        prune_checkpoint(sharded, tmp_path / "out2", CONFIGS["magnitude"])
    assert "Free space first" not in caplog.text


def test_the_sources_file_modes_are_not_copied(sharded, tmp_path, bpe_tokenizer):
    """copy2 copied them: a read-only source (git-annex, the Nix store) made the tokenizer's save fail after every
    layer was pruned, and each rerun again."""
    for file in sharded.glob("*.json"):
        if "token" in file.name:
            file.chmod(0o400)
    prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"], tokenizer=bpe_tokenizer)
    expected = atomic_files.new_file_mode()
    assert {file.name: file.stat().st_mode & 0o777 for file in (tmp_path / "out").iterdir()} == {
        file.name: expected for file in (tmp_path / "out").iterdir()
    }


def test_streamed_shards_follow_the_umask_whatever_safetensors_writes(sharded, tmp_path, monkeypatch):
    """safetensors 0.8 (what a plain pip install resolves) creates its files 0600: the pruned shards were unreadable to
    the other users the rest of the checkpoint is readable to."""
    monkeypatch.setattr(streaming, "save_file", owner_only(save_file))
    prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    expected = atomic_files.new_file_mode()
    assert {file.name: file.stat().st_mode & 0o777 for file in (tmp_path / "out").glob("*.safetensors")} == {
        file.name: expected for file in (tmp_path / "out").glob("*.safetensors")
    }


def test_where_a_folder_cannot_be_renamed_onto_another_the_run_finishes(sharded, tmp_path, monkeypatch):
    """Windows (no fcntl, no renameat2, no rename onto an existing folder): the run failed after its last layer."""
    import os

    renamed = os.replace

    def windows_replace(source, target, *args, **kwargs):
        if os.path.isdir(target):
            raise PermissionError(5, "Access is denied", str(target))
        return renamed(source, target, *args, **kwargs)

    monkeypatch.setattr(atomic_files, "fcntl", None)
    monkeypatch.setattr(atomic_files, "_RENAMEAT2", None)
    monkeypatch.setattr(os, "replace", windows_replace)
    for _ in range(2):  # a new output, then replacing it
        prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"]
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict(), pruned_in_memory(sharded, CONFIGS["magnitude"], None))


def test_where_folders_cannot_be_locked_the_run_goes_on_and_says_so(sharded, tmp_path, monkeypatch, caplog):
    """NFS without lockd, Lustre without -o flock: the lock failed the whole run."""
    def unsupported(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(atomic_files.fcntl, "flock", unsupported)
    with caplog.at_level("WARNING", logger="optimum_prune"):
        prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    assert "cannot be locked on this file system" in caplog.text and (tmp_path / "out" / "config.json").is_file()


def test_a_run_killed_while_removing_the_output_it_replaced_leaves_no_partial_folder_behind(sharded, tmp_path, monkeypatch):
    """Swapped with the partial folder, the previous output took its name: a kill while removing it left that
    output's layers there, and every later run was refused for "another run"."""
    prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    interrupted = []
    monkeypatch.setattr(atomic_files, "_remove_replaced", lambda folder: interrupted.append(folder.name) or (_ for _ in ()).throw(KeyboardInterrupt()))
    again = PruningConfig(method="magnitude", sparsity=0.6)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoint(sharded, tmp_path / "out", again)
    monkeypatch.undo()
    assert interrupted[0].startswith(".out.staging-") and not (tmp_path / ".out.partial").exists()
    prune_checkpoint(sharded, tmp_path / "out", again)
    assert PruningConfig.from_pretrained(tmp_path / "out") == again


@pytest.mark.parametrize("step", ["replace", "give_output_mode"])
def test_a_run_interrupted_as_it_puts_its_output_in_place_resumes_from_its_partial_folder(sharded, tmp_path, monkeypatch, step):
    """Ctrl-C just after the partial folder took a staging name left the layers there, where the next run removed
    them as a killed save's leftovers, though the message said they were kept in .out.partial."""
    import os

    replace = os.replace

    def interrupted(*args):
        raise KeyboardInterrupt

    def interrupted_once_renamed_to_a_staging_name(source, target):
        replace(source, target)
        if Path(target).name.startswith(".out.staging-"):
            interrupted()

    if step == "replace":
        monkeypatch.setattr(os, "replace", interrupted_once_renamed_to_a_staging_name)
    else:
        monkeypatch.setattr(streaming, step, interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    monkeypatch.undo()
    assert sorted(path.name for path in tmp_path.iterdir()) == [".out.partial", "source"]
    assert (tmp_path / ".out.partial" / "streaming-run.json").is_file()
    saved = []
    original = LayerStream._save
    monkeypatch.setattr(LayerStream, "_save", lambda self, index, *a: saved.append(index) or original(self, index, *a))
    prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    assert saved == [] and sorted(path.name for path in tmp_path.iterdir()) == ["out", "source"]


def test_a_link_planted_in_the_partial_folder_is_not_written_through(sharded, tmp_path):
    """The run record and the shards were written to fixed temporary names, following a link planted there (by
    another user of a shared directory) onto a file of the victim's."""
    import os

    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    for name in (".streaming-run.json.tmp", ".model-layer-00000.safetensors.tmp"):
        os.symlink(victim, partial / name)
    prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    assert victim.read_text() == "keep" and not [path.name for path in (tmp_path / "out").iterdir() if path.name.startswith(".")]


@pytest.mark.parametrize(
    ("planted", "message"),
    [("foreign", r"belongs to another user \(uid 65534\), not to this one: remove it"),
     ("writable", r"can be written by other users \(mode 0o777\), who could have planted files in it: `chmod go-w` it if no one else can have written in it \(a run resumes from its layers\), else remove it")],
)  # fmt: skip
def test_a_partial_folder_another_user_made_or_can_write_in_is_refused(sharded, tmp_path, planted, message):
    """Taken over as it was, a folder made beforehand in a shared directory (another user's, or world-writable) let
    them redirect the run's writes and became the output, theirs to change."""
    import os

    partial = tmp_path / ".out.partial"
    partial.mkdir()
    if planted == "foreign":
        os.chown(partial, 65534, 65534)  # the tests run as root: a foreign uid is a chown away
    else:
        partial.chmod(0o777)
    with pytest.raises(ValueError, match=r"\.out\.partial' " + message):
        prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    assert not (tmp_path / "out").exists()


def test_the_partial_folder_is_private_until_it_becomes_the_output(sharded, tmp_path, monkeypatch):
    _killed_while_saving(sharded, tmp_path, monkeypatch, 1, CONFIGS["magnitude"])
    assert (tmp_path / ".out.partial").stat().st_mode & 0o777 == 0o700
    prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    (tmp_path / "fresh").mkdir()  # the mode the umask gives a new folder
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "fresh").stat().st_mode


@pytest.mark.parametrize(
    ("config", "options", "message"),
    [
        (PruningConfig(method="magnitude", ignore=["*.q_prj"]), {}, "PruningConfig.ignore pattern"),
        (PruningConfig(method="magnitude", sparsity="3:5"), {}, "PruningConfig.sparsity '3:5' cannot be applied"),
        (PruningConfig(method="magnitude"), {"device": "gpu"}, "device 'gpu' is not a device name"),
        (PruningConfig(method="wanda"), {"activation_device": "gpu"}, "activation_device 'gpu' is not a device name"),
        (PruningConfig(method="magnitude"), {"activation_device": "cpu"}, "'magnitude' .allocation 'uniform'. reads no calibration"),
    ],
)
def test_checks_that_need_no_data_run_before_any_folder_is_made(sharded, tmp_path, config, options, message):
    with pytest.raises(ValueError, match=message):
        prune_checkpoint(sharded, tmp_path / "out", config, **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (PruningConfig(method="width", sparsity=0.2), "'width' needs the whole model in memory"),
        (PruningConfig(method="llm_surgeon", sparsity=0.5), "'llm_surgeon' needs the whole model in memory"),
        (PruningConfig(method="wanda", sparsity=0.5, allocation="sensitivity"), "allocation 'sensitivity'"),
    ],
)
def test_what_needs_the_whole_model_is_refused(sharded, tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        prune_checkpoint(sharded, tmp_path / "out", config, calibration=token_windows())


def test_a_gguf_source_is_refused_with_the_way_round(tmp_path):
    (tmp_path / "model.gguf").touch()
    with pytest.raises(ValueError, match=r"model.gguf' is a GGUF file: .*prune it in memory"):
        prune_checkpoint(tmp_path / "model.gguf", tmp_path / "out", CONFIGS["magnitude"])


def test_source_without_weights_is_named(tmp_path):
    tiny_model().config.save_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no safetensors weights"):
        prune_checkpoint(tmp_path / "empty", tmp_path / "out", CONFIGS["magnitude"])


def test_a_truncated_shard_is_named(sharded, tmp_path):
    shard = sorted(sharded.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # an interrupted copy
    with pytest.raises(ValueError, match=rf"{shard.name}: the weights could not be read .*incomplete or corrupt"):
        prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("stored", "message"), [
    (torch.zeros(64, 100), r"stores model.layers.2.mlp.down_proj.weight as F32 \[64, 100\]; its config makes it a float tensor of shape \[64, 128\]"),
    (torch.ones(64, 128, dtype=torch.int64), r"stores model.layers.2.mlp.down_proj.weight as I64 \[64, 128\]"),
])  # fmt: skip
def test_a_layer_tensor_its_config_does_not_shape_is_named_before_any_layer_is_pruned(sharded, tmp_path, stored, message):
    """It failed after earlier layers were pruned and written, in accelerate, naming no file."""
    import json

    from safetensors.torch import load_file, save_file

    name = "model.layers.2.mlp.down_proj.weight"
    shard = sharded / json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    save_file({**tensors, name: stored}, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    assert not list((tmp_path / ".out.partial").glob("model-layer-*"))


def test_damaged_notes_a_planted_link_and_files_linking_out_of_the_checkpoint_are_named(sharded, tmp_path, monkeypatch, caplog):
    import os

    config = CONFIGS["magnitude"]
    _killed_while_saving(sharded, tmp_path, monkeypatch, 1, config)
    (tmp_path / ".out.partial" / "streaming-notes.json").write_text('{"0": 5}')
    with pytest.raises(ValueError, match=r"streaming-notes.json is damaged .*: delete the partial folder"):
        prune_checkpoint(sharded, tmp_path / "out", config)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / ".link.partial")
    with pytest.raises(ValueError, match=r"link.partial' is a symbolic link or a file, not a folder this user made"):
        prune_checkpoint(sharded, tmp_path / "link", config)
    assert not list(elsewhere.iterdir())
    (tmp_path / "secret").write_text("token")
    os.symlink(tmp_path / "secret", sharded / "added_tokens.json")
    with caplog.at_level("WARNING", logger="optimum_prune"):
        prune_checkpoint(sharded, tmp_path / "copied", config)
    assert "added_tokens.json links outside the checkpoint" in caplog.text and not (tmp_path / "copied" / "added_tokens.json").exists()
    blobs = tmp_path / "hub" / "models--org--tiny" / "blobs"  # a local_dir download linking into the Hub cache
    blobs.mkdir(parents=True)
    (sharded / "tokenizer.json").rename(blobs / "0123abcd")
    os.symlink(blobs / "0123abcd", sharded / "tokenizer.json")
    prune_checkpoint(sharded, tmp_path / "linked", config)
    assert (tmp_path / "linked" / "tokenizer.json").read_bytes() == (blobs / "0123abcd").read_bytes()


def test_an_output_dir_holding_other_files_is_refused_before_pruning(sharded, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("notes")
    monkeypatch.setattr("optimum_prune.api.prune_loaded", lambda *args, **kwargs: pytest.fail("pruning started"))
    with pytest.raises(ValueError, match="holds other files"):
        prune_checkpoint(sharded, tmp_path / "out", CONFIGS["magnitude"])
    assert (tmp_path / "out" / "notes.txt").read_text() == "notes"


def test_bfloat16_checkpoint_is_pruned_and_saved_in_bfloat16(tmp_path, bpe_tokenizer):
    source = tmp_path / "bf16"
    tiny_model().to(torch.bfloat16).save_pretrained(source)
    bpe_tokenizer.save_pretrained(source)
    windows, config = token_windows(), CONFIGS["wanda"]
    prune_checkpoint(source, tmp_path / "out", config, calibration=windows)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    prune(model, config, calibration=windows)
    assert_same_weights(reloaded.state_dict(), model.state_dict())


def test_the_dtype_config_json_declares_wins_over_a_float32_first_tensor(tmp_path):
    """The checkpoint's first tensor decided the dtype: one float32 tensor there doubled the pruned checkpoint's size."""
    from safetensors.torch import load_file, save_file

    source = tmp_path / "bf16"
    tiny_model().to(torch.bfloat16).save_pretrained(source)
    tensors = load_file(source / "model.safetensors")
    first = next(iter(CheckpointReader(source).weight_map))
    tensors[first] = tensors[first].float()
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    prune_checkpoint(source, tmp_path / "out", CONFIGS["magnitude"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}


def test_a_structured_result_with_per_layer_shapes_is_refused_naming_the_in_memory_path(tmp_path):
    """Its layers were built at the config's stock shapes and loading the first one failed inside accelerate."""
    from optimum_prune import save_pruned

    model = tiny_model()
    prune(model, PruningConfig(method="width", sparsity=0.3, method_options={"ranking": "global", "criterion": "magnitude_l2"}))
    save_pruned(model, tmp_path / "uneven")
    with pytest.raises(ValueError, match=r"is a structured result with per-layer shapes .* load it in memory \(optimum_prune.load_model\)"):
        prune_checkpoint(tmp_path / "uneven", tmp_path / "out", CONFIGS["magnitude"])
    assert not (tmp_path / "out").exists()


def test_a_requested_dtype_is_what_the_saved_config_says(tmp_path):
    source = tmp_path / "bf16"
    tiny_model().to(torch.bfloat16).save_pretrained(source)
    prune_checkpoint(source, tmp_path / "out", CONFIGS["magnitude"], dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert reloaded.dtype == torch.float32


def test_cli_offload_disk(sharded, tmp_path, capsys):
    assert main(["--model", str(sharded), "--offload", "disk", "--activation-device", "disk", "--method", "wanda",
                 "--sparsity", "2:4", "--calibration-samples", "4", "--seq-len", "32", "--output", str(tmp_path / "out")]) == 0  # fmt: skip
    assert verify_sparsity(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), "2:4")["conforming"]
    with pytest.raises(SystemExit) as exit:
        main(["--model", str(sharded), "--offload", "disk", "--eval", "--output", str(tmp_path / "other")])
    assert exit.value.code == 2 and "never holds the whole model" in capsys.readouterr().err


def test_peak_memory_is_the_process_own_even_when_started_by_a_larger_one():
    """Linux keeps ru_maxrss across exec, so a child would report this (larger) process's peak."""
    import subprocess
    import sys

    from optimum_prune.report import process_peak_rss

    ballast = torch.ones(2**28)  # 1 GiB held by this process
    script = "from optimum_prune.report import process_peak_rss; print(process_peak_rss())"
    child = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < process_peak_rss() - ballast.numel() * 4 // 2


def test_peak_memory_is_the_runs_not_what_the_process_held_before():
    """A notebook that loaded something larger earlier reported that as the pruning's peak."""
    from optimum_prune.report import process_peak_rss

    ballast = torch.ones(2**28)  # 1 GiB, touched, then freed
    del ballast
    lifetime = process_peak_rss()
    report = prune(tiny_model(), PruningConfig(method="magnitude", sparsity=0.5))
    if report.peak_memory_kind.endswith("since the process started"):
        pytest.skip("this machine: it cannot reset a process's peak resident memory")
    assert report.peak_memory_kind == "process RSS" and report.peak_memory_bytes < lifetime - 2**29


def test_prune_takes_a_checkpoint_directory_and_streams_it_into_output_dir(sharded, tmp_path):
    windows = token_windows()
    report = prune(str(sharded), {"method": "wanda", "sparsity": 0.5}, calibration=windows, output_dir=tmp_path / "out")
    assert len(report.linears) == 3 * 7
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_same_weights(reloaded.state_dict(), pruned_in_memory(sharded, CONFIGS["wanda"], windows))
    with pytest.raises(ValueError, match="pass output_dir="):
        prune(sharded, CONFIGS["wanda"], calibration=windows)
    with pytest.raises(ValueError, match="save it with save_pruned"):
        prune(tiny_model(), CONFIGS["wanda"], calibration=windows, output_dir=tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()


def test_a_model_spread_over_several_devices_is_refused_before_any_change():
    model = tiny_model()
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "model.norm": 1, "lm_head": 1}  # as device_map="auto" on 2 GPUs
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"dispatched over several devices by its device_map \(0, 1\); .*load it on one device"):
        prune(model, CONFIGS["wanda"], calibration=token_windows())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_model_accelerate_offloaded_is_refused_with_the_way_to_stream_it(sharded, tmp_path):
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" if i else "cpu" for i in range(3)}
    model = AutoModelForCausalLM.from_pretrained(sharded, device_map=device_map, offload_folder=tmp_path / "offload")
    assert any(parameter.is_meta for parameter in model.parameters())  # what a device_map offload leaves in place
    with pytest.raises(ValueError, match=r"^model.layers.1, model.layers.2 hold offloaded weights .*prune\(path, config, output_dir=...\)"):
        prune(model, CONFIGS["wanda"], calibration=token_windows())
    # a method that cannot run from disk is not sent there (that path refused it in turn)
    with pytest.raises(ValueError, match=r"without offloading; or 'width' with allocation 'uniform' needs the whole model in memory"):
        prune(model, PruningConfig(method="width", sparsity=0.25), calibration=token_windows())


def test_extra_layer_tensors_and_other_weight_formats_of_the_source_stay_behind(tmp_path, bpe_tokenizer):
    from safetensors.torch import load_file, save_file

    source = tmp_path / "source"
    tiny_model().save_pretrained(source)
    bpe_tokenizer.save_pretrained(source)
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # older Llama checkpoints carry these
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    torch.save({}, source / "pytorch_model.bin")  # the dense weights in another format, as many hub repos ship them
    (source / "pytorch_model.bin.index.json").write_text("{}")
    (source / "layer_scores.png").write_bytes(b"an earlier depth run's plot")  # and its report: not this run's
    (source / "pruning_report.json").write_text('{"method": "layers"}')

    prune_checkpoint(source, tmp_path / "out", CONFIGS["magnitude"])
    names = {path.name for path in (tmp_path / "out").iterdir()}
    assert not names & {"pytorch_model.bin", "pytorch_model.bin.index.json", "layer_scores.png"} and "tokenizer.json" in names
    assert json.loads((tmp_path / "out" / "pruning_report.json").read_text())["method"] == "magnitude"
    expected = tiny_model()
    prune(expected, CONFIGS["magnitude"])
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict(), expected.state_dict())


def _last_layer_shard(source):
    import json

    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    return source / weight_map[max(name for name in weight_map if name.startswith("model.layers."))]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda source: _last_layer_shard(source).unlink(), "is listed in model.safetensors.index.json but missing"),
        (lambda source: _last_layer_shard(source).write_bytes(_last_layer_shard(source).read_bytes()[:-100]), "the weights could not be read"),
        (lambda source: (source / "model.safetensors.index.json").write_text("{weight_map: 1}"), "is not a safetensors index"),
        (
            lambda source: (source / "model.safetensors.index.json").write_text(
                (source / "model.safetensors.index.json").read_text().replace('"model.layers.1.mlp.down_proj.weight"', '"unused"')
            ),
            r"no tensor\(s\) model.layers.1.mlp.down_proj.weight \(1 in all\)",
        ),
    ],
    ids=["missing shard", "truncated shard", "broken index", "missing layer tensor"],
)
def test_a_damaged_checkpoint_is_refused_before_any_layer_is_pruned(sharded, tmp_path, damage, message):
    damage(sharded)
    with pytest.raises(ValueError, match=message):
        prune_checkpoint(sharded, tmp_path / "out", PruningConfig(method="magnitude"))
    assert not (tmp_path / ".out.partial").exists() and not (tmp_path / "out").exists()


def test_arguments_of_the_wrong_kind_are_named(sharded, tmp_path):
    with pytest.raises(TypeError, match="config must be a PruningConfig or a dict, got str"):
        prune_checkpoint(sharded, tmp_path / "out", "magnitude")
    with pytest.raises(ValueError, match=r"dtype torch.int8: offloaded pruning reads and writes float32, bfloat16, float16"):
        prune_checkpoint(sharded, tmp_path / "out", PruningConfig(method="magnitude"), dtype=torch.int8)
    prune_checkpoint(sharded, tmp_path / "out", PruningConfig(method="magnitude"), dtype="bf16")  # a name works too, as --dtype takes it
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto").dtype == torch.bfloat16
    source_dtype = AutoModelForCausalLM.from_pretrained(sharded, dtype="auto").dtype
    prune_checkpoint(sharded, tmp_path / "auto", PruningConfig(method="magnitude"), dtype="auto")  # as README says (refused)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "auto", dtype="auto").dtype == source_dtype


def test_moe_options_on_a_dense_checkpoint_are_refused_before_any_folder_is_made(sharded, tmp_path):
    with pytest.raises(ValueError, match="LlamaForCausalLM has none: remove them"):
        prune_checkpoint(sharded, tmp_path / "out", PruningConfig(method="magnitude", moe_options={"prune_router": True}))
    assert not (tmp_path / ".out.partial").exists() and not (tmp_path / "out").exists()


def test_an_offloaded_run_warns_of_over_long_windows_once(sharded, tmp_path, caplog):
    """prune_checkpoint checked the windows before staging, then prune() checked them again: two warnings."""
    import logging

    context = AutoModelForCausalLM.from_pretrained(sharded).config.max_position_embeddings
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune_checkpoint(sharded, tmp_path / "out", CONFIGS["wanda"], calibration=token_windows(samples=2, seq_len=context + 8))
    assert sum("longer than" in record.getMessage() for record in caplog.records) == 1


def test_a_run_resumed_after_several_layers_reports_each_unrouted_expert_once(tmp_path, monkeypatch):
    """Each finished layer's note holds that layer's unrouted experts only: a resumed run lists them as the
    uninterrupted one does (killed at layer 2, so that two noted layers are read back)."""
    tiny_moe("mixtral", num_local_experts=16, num_experts_per_tok=1, num_hidden_layers=3).save_pretrained(tmp_path / "moe")
    config = PruningConfig(method="wanda", sparsity=0.5, moe_options={"unrouted_experts": "dense"})
    windows = token_windows(2, 4)
    full = prune_checkpoint(tmp_path / "moe", tmp_path / "full", config, calibration=windows)
    assert {row.split(".")[2] for row in full.unrouted} >= {"0", "1"}  # unrouted experts in both noted layers
    _killed_while_saving(tmp_path / "moe", tmp_path, monkeypatch, 2, config, calibration=windows)
    resumed = prune_checkpoint(tmp_path / "moe", tmp_path / "out", config, calibration=windows)
    assert resumed.unrouted == full.unrouted and resumed.linears == full.linears


def test_a_resumed_run_reports_the_zeros_the_finished_layers_revived(tmp_path, monkeypatch):
    """SparseGPT on an already sparse checkpoint revives zeros; a resumed run must say so for its finished layers."""
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    model.save_pretrained(tmp_path / "sparse")
    config, windows = PruningConfig(method="sparsegpt", sparsity="2:4"), token_windows()
    full = prune_checkpoint(tmp_path / "sparse", tmp_path / "full", config, calibration=windows)
    assert any(".layers.0." in name for name in full.revived_zeros)
    _killed_while_saving(tmp_path / "sparse", tmp_path, monkeypatch, 1, config, calibration=windows)
    resumed = prune_checkpoint(tmp_path / "sparse", tmp_path / "out", config, calibration=windows)
    assert resumed.revived_zeros == full.revived_zeros


def test_cli_offload_disk_prunes_in_the_dtype_asked_for(sharded, tmp_path):
    assert main(["--model", str(sharded), "--offload", "disk", "--method", "magnitude", "--sparsity", "0.5",
                 "--dtype", "bf16", "--output", str(tmp_path / "out")]) == 0  # fmt: skip
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}


def test_cli_offload_disk_calibrates_on_the_calibration_file(sharded, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(f"line {i}: the quick brown fox {i * 7} jumps over {i * 3} lazy dogs" for i in range(400)))
    flags = ["--method", "wanda", "--sparsity", "0.5", "--calibration-samples", "4", "--seq-len", "32"]
    assert main(["--model", str(sharded), "--offload", "disk", *flags, "--calibration", str(text), "--output", str(tmp_path / "cli")]) == 0
    config = PruningConfig(method="wanda", sparsity=0.5, num_calibration_samples=4, calibration_seq_len=32)
    prune_checkpoint(sharded, tmp_path / "api", config, calibration=text, tokenizer=load_tokenizer(sharded))
    assert_same_weights(
        AutoModelForCausalLM.from_pretrained(tmp_path / "cli").state_dict(),
        AutoModelForCausalLM.from_pretrained(tmp_path / "api").state_dict(),
    )


def test_cli_offload_disk_keeps_activations_in_files(sharded, tmp_path, monkeypatch):
    homes = []
    original = engine._activation_home
    monkeypatch.setattr(engine, "_activation_home", lambda device: homes.append(device) or original(device))
    assert main(["--model", str(sharded), "--offload", "disk", "--activation-device", "disk", "--method", "wanda",
                 "--sparsity", "0.5", "--calibration-samples", "2", "--seq-len", "16", "--output", str(tmp_path / "out")]) == 0  # fmt: skip
    assert homes == ["disk"]


def test_a_layer_reads_its_own_tensors_only_past_ten_layers(tmp_path, caplog):
    """model.layers.1 is not a prefix of model.layers.10's tensors: loading layer 1 must not read layers 10-11 too
    (memory of several layers, and a warning of tensors the model does not have)."""
    tiny_model(num_hidden_layers=12).save_pretrained(tmp_path / "deep")
    reader = CheckpointReader(tmp_path / "deep")
    assert reader.under("model.layers.1") and all(name.startswith("model.layers.1.") for name in reader.under("model.layers.1"))
    with caplog.at_level("WARNING", logger="optimum_prune"):
        prune_checkpoint(tmp_path / "deep", tmp_path / "out", PruningConfig(method="magnitude", sparsity=0.5))
    assert "hold tensors the model does not have" not in caplog.text


def test_every_stored_tensor_is_in_the_requested_dtype(tmp_path):
    """The embeddings, final norm and head (the 'rest' shard) are written in the run's dtype too, not the source's:
    from_pretrained(dtype="auto") hides a float32 embedding in a bfloat16 checkpoint, the file size does not."""
    tiny_model().save_pretrained(tmp_path / "fp32")
    prune_checkpoint(tmp_path / "fp32", tmp_path / "out", PruningConfig(method="magnitude", sparsity=0.5), dtype="bfloat16")
    for shard in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(shard, framework="pt") as handle:
            assert {handle.get_slice(name).get_dtype() for name in handle.keys()} == {"BF16"}, shard.name


def test_non_utf8_safetensors_index_is_named(model_dir, tmp_path):
    tensors = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00001.safetensors")
    weight_map = json.dumps(dict.fromkeys(tensors, "model-00001-of-00001.safetensors")).encode()
    (model_dir / "model.safetensors.index.json").write_bytes(b'{"metadata": {"x": "' + "café".encode("latin-1") + b'"}, "weight_map": ' + weight_map + b"}")
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        prune_checkpoint(model_dir, tmp_path / "out", {"method": "magnitude"})


@pytest.mark.parametrize("text", ["{", "[1]"])
def test_prune_checkpoint_names_a_damaged_config_json(model_dir, tmp_path, text):
    (model_dir / "config.json").write_text(text)
    with pytest.raises(ValueError, match="config.json"):  # was: OSError ("{"), TypeError "list indices must be integers" ("[1]")
        prune_checkpoint(model_dir, tmp_path / "out", {"method": "magnitude"})


def test_prune_checkpoint_names_a_config_json_whose_sizes_are_not_numbers(model_dir, tmp_path):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "hidden_size": str(config["hidden_size"])}))
    with pytest.raises(ValueError, match="config.json' does not describe a model that can be built"):  # was: TypeError from torch.empty
        prune_checkpoint(model_dir, tmp_path / "out", {"method": "magnitude"})
    assert not (tmp_path / "out").exists()


def test_prune_checkpoint_refuses_a_checkpoint_without_its_head(model_dir, tmp_path):
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["lm_head.weight"], tensors["model.norm.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="lm_head.weight"):  # was: writes out/ without them; stock reload fills them at random
        prune_checkpoint(model_dir, out, {"method": "magnitude"})
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_prune_checkpoint_leaves_a_vocab_file_outside_the_tokenizers_folder_out_of_the_output(model_dir, tmp_path):
    """As save_pruned does (tests/test_saving.py): the tokenizer's save copied it whole as tokenizer.model."""
    (tmp_path / "id_rsa").write_text("PRIVATE KEY")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="LlamaTokenizerFast", vocab_file=str(tmp_path / "id_rsa"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    prune_checkpoint(model_dir, tmp_path / "out", CONFIGS["magnitude"], tokenizer=load_tokenizer(model_dir))
    assert not (tmp_path / "out" / "tokenizer.model").exists()


def test_prune_checkpoint_refuses_a_checkpoint_without_embeddings(model_dir, tmp_path):
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    from optimum_prune.models import load_tokenizer

    config = {"method": "wanda", "num_calibration_samples": 2, "calibration_seq_len": 16}
    with pytest.raises(ValueError, match="embed_tokens"):  # was: NotImplementedError "Cannot copy out of meta tensor"
        prune_checkpoint(model_dir, tmp_path / "out", config, tokenizer=load_tokenizer(model_dir))
    assert not (tmp_path / ".out.partial").exists()  # was: left behind


@pytest.mark.parametrize("where", ["lm_head.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.weight"])
def test_a_float16_cast_that_overflows_is_refused_naming_the_tensor(tmp_path, where):
    """bfloat16 holds 1e5, float16 not: the head and final norm were written as inf without a word, and a layer's
    overflow was blamed on the checkpoint ("holds NaN or inf")."""
    model = tiny_model().to(torch.bfloat16)
    with torch.no_grad():
        model.get_parameter(where).view(-1)[0] = 1e5
    model.save_pretrained(tmp_path / "source")
    with pytest.raises(ValueError, match=rf"{re.escape(where)} holds values up to 9.98\d*e\+04 \(torch.bfloat16\), past float16's largest .* give dtype='bfloat16' \(the checkpoint's\)$"):
        prune_checkpoint(tmp_path / "source", tmp_path / "out", CONFIGS["wanda"], calibration=token_windows(), dtype=torch.float16)
    assert not (tmp_path / "out").exists()
    if where.startswith("model.layers"):
        return
    assert not list(tmp_path.glob(".out.partial/model-layer-*"))  # refused before any layer was pruned


def test_an_n_m_checkpoint_is_pruned_from_disk_to_another_target(tmp_path):
    """The check whether an unstructured step breaks the earlier N:M pattern read the offloaded model's unloaded
    (meta) weights: "Tensor.item() cannot be called on meta tensors"."""
    from optimum_prune import save_pruned

    model = tiny_model()
    prune(model, PruningConfig(method="sparsegpt", sparsity="2:4"), calibration=token_windows())
    save_pruned(model, tmp_path / "nm")
    prune_checkpoint(tmp_path / "nm", tmp_path / "out", PruningConfig(method="sparsegpt", sparsity=0.6), calibration=token_windows())
    assert verify_sparsity(AutoModelForCausalLM.from_pretrained(tmp_path / "out"))["overall_sparsity"] > 0.55


def test_the_sources_other_files_are_left_out_and_its_licence_kept_so_a_rerun_replaces_the_output(tmp_path):
    """Every file beside the weights was copied: a ModelScope configuration.json or Mistral's params.json (and any
    Hub snapshot's README.md, the dense model's card) then made the output refuse its own rerun as holding the user's files."""
    source = tmp_path / "source"
    tiny_model().save_pretrained(source)
    for name in ("configuration.json", "params.json", "README.md", "LICENSE", "USE_POLICY.md"):
        (source / name).write_text(name)
    for sparsity in (0.5, 0.6):
        prune_checkpoint(source, tmp_path / "out", PruningConfig(method="magnitude", sparsity=sparsity))
    names = {path.name for path in (tmp_path / "out").iterdir()}
    assert {"LICENSE", "USE_POLICY.md"} <= names and not names & {"configuration.json", "params.json", "README.md"}


def test_text_calibration_is_tokenised_with_the_checkpoints_own_tokenizer(sharded, tmp_path, bpe_tokenizer):
    """It was refused ("tokenizer is required") though the folder holds one, which load_model and the CLI load."""
    config = PruningConfig(method="wanda", sparsity=0.5, num_calibration_samples=2, calibration_seq_len=16)
    texts = ["The cat sat on the mat. " * 40]
    report = prune(str(sharded), config, calibration=texts, output_dir=tmp_path / "out")
    assert report.calibration_tokens == 32
    given = prune_checkpoint(sharded, tmp_path / "given", config, calibration=texts, tokenizer=bpe_tokenizer)
    by_folder, by_argument = (AutoModelForCausalLM.from_pretrained(tmp_path / name).state_dict() for name in ("out", "given"))
    assert given.calibration_tokens == 32 and all(torch.equal(by_folder[name], by_argument[name]) for name in by_argument)
    weights_only = tmp_path / "weights-only"
    tiny_model().save_pretrained(weights_only)
    with pytest.raises(ValueError, match=r"'.*weights-only' has no tokenizer .*which calibration needs: .*, pass one as tokenizer=, "):
        prune_checkpoint(weights_only, tmp_path / "none", config, calibration=texts)
    prune_checkpoint(weights_only, tmp_path / "ids", config, calibration=token_windows(2, 16))  # token ids need none
    (sharded / "tokenizer.json").write_text("{ not json")
    prune_checkpoint(sharded, tmp_path / "damaged", config, calibration=token_windows(2, 16))  # nor is the folder's read
