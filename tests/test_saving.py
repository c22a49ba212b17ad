import copy
import errno
import json
import logging
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from optimum_prune import NMPattern, PERPConfig, PruningConfig, load_model, merge_perp, prepare_perp, prune, save_pruned, sparsify
from optimum_prune import atomic_files

from .conftest import assert_stock_reload_matches, owner_only, tiny_model, token_windows


def test_reload_without_package_is_bit_exact(tmp_path):
    model = tiny_model()
    config = PruningConfig(method="sparsegpt", sparsity="2:4")
    prune(model, config, calibration=token_windows())
    output = save_pruned(model, tmp_path / "pruned")

    assert sorted(p.name for p in output.iterdir()) == ["config.json", "generation_config.json", "model.safetensors", "pruning_config.json"]
    assert PruningConfig.from_json_file(output / "pruning_config.json") == config
    assert PruningConfig.from_dict(json.loads((output / "config.json").read_text())["pruning_config"]) == config
    saved = load_file(output / "model.safetensors")
    state = model.state_dict()
    assert saved.keys() <= state.keys() and {n for n in state if n not in saved} <= {"lm_head.weight"}  # tied: stored once
    for name, tensor in saved.items():
        assert torch.equal(tensor, state[name]), name

    assert assert_stock_reload_matches(model, output, token_windows(samples=2, seq_len=16), tmp_path) == "sparsegpt"


def test_a_config_given_as_a_dict_is_saved_as_prune_takes_it(tmp_path):
    model = tiny_model()
    config = {"method": "magnitude", "sparsity": 0.5}
    prune(model, config)
    output = save_pruned(model, tmp_path / "pruned", config=config)
    assert PruningConfig.from_json_file(output / "pruning_config.json") == PruningConfig.from_dict(config)
    assert "pruning_history" not in json.loads((output / "config.json").read_text())  # the recorded step, not another


def test_a_config_changed_after_construction_is_checked_again_by_prune_and_save_pruned(tmp_path):
    model = tiny_model()
    config = PruningConfig(method="magnitude", sparsity=0.5)
    config.sparsity = NMPattern(2, 4)  # what PruningConfig(sparsity=NMPattern(2, 4)) reads as "2:4"
    prune(model, config)
    assert model.config.pruning_config["sparsity"] == "2:4"
    save_pruned(model, tmp_path / "pruned")
    assert PruningConfig.from_pretrained(tmp_path / "pruned").sparsity == "2:4"
    config.sparsity = 1.5
    with pytest.raises(ValueError, match="PruningConfig.sparsity"):
        prune(tiny_model(), config)
    owl = PruningConfig(method="magnitude", allocation="owl")
    owl.sparsity = "2:4"
    with pytest.raises(ValueError, match="owl"):
        prune(tiny_model(), owl, calibration=token_windows(4, 32))
    with pytest.raises(ValueError, match="owl"):
        save_pruned(tiny_model(), tmp_path / "other", config=owl)
    samples = PruningConfig(method="wanda")
    samples.num_calibration_samples = 0
    with pytest.raises(ValueError, match="num_calibration_samples"):
        prune(tiny_model(), samples, calibration=token_windows(4, 32))


def test_save_pruned_names_a_config_or_report_of_the_wrong_type(tmp_path):
    with pytest.raises(TypeError, match="config must be a PruningConfig"):
        save_pruned(tiny_model(), tmp_path / "pruned", config="wanda")
    model = tiny_model()
    report = prune(model, PruningConfig(method="magnitude"))
    with pytest.raises(TypeError, match="report must be the PruningReport"):
        save_pruned(model, tmp_path / "pruned", report=report.to_dict())


def test_a_checkpoint_whose_history_ends_before_its_config_keeps_every_step_when_pruned_again():
    """Earlier versions' save_pruned(config=...) wrote the given config without appending it to the history."""
    model = tiny_model()
    steps = [PruningConfig(method="magnitude", sparsity=s) for s in (0.3, 0.4, 0.5)]
    model.config.pruning_history = [steps[0].to_dict(), steps[1].to_dict()]
    model.config.pruning_config = steps[2].to_dict()
    prune(model, PruningConfig(method="magnitude", sparsity=0.6))
    assert [PruningConfig.from_dict(step) for step in model.config.pruning_history] == [*steps, PruningConfig(method="magnitude", sparsity=0.6)]


@pytest.mark.parametrize(("history", "current"), [(5, None), ("abc", None), ([1, "x"], None), (None, ["magnitude"])])
def test_a_history_that_holds_no_steps_is_left_out_not_crashed_on_or_copied(history, current, caplog):
    """An int crashed prune; a string was recorded letter by letter into the next checkpoint's history."""
    model = tiny_model()
    model.config.pruning_history, model.config.pruning_config = history, current
    with caplog.at_level("WARNING", logger="optimum_prune"):
        prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    assert "hold entries that are no pruning step: left out" in caplog.text
    assert not hasattr(model.config, "pruning_history")
    assert PruningConfig.from_dict(model.config.pruning_config) == PruningConfig(method="magnitude", sparsity=0.5)


def test_the_recipe_of_a_model_pruned_in_several_steps_is_read_as_its_last_step_with_the_way_to_repeat_all(tmp_path, caplog):
    """pruning_config.json is the last step; the warning's line repeats the whole recipe, bit for bit."""
    from transformers import AutoConfig

    from optimum_prune import compress

    model, windows = tiny_model(), token_windows(4, 16)
    first, second = PruningConfig(method="width", sparsity=0.25), PruningConfig(method="wanda", sparsity=0.5)
    compress(model, [first, second], windows)
    output = save_pruned(model, tmp_path / "pruned")
    for given in (output, output / "pruning_config.json"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="optimum_prune"):
            assert PruningConfig.from_pretrained(given) == second
        assert "pruned in 2 steps (width 0.25, then wanda 0.5)" in caplog.text
    assert "compress(model, AutoConfig.from_pretrained(" in caplog.text

    again = tiny_model()
    compress(again, AutoConfig.from_pretrained(output).pruning_history, windows)
    for name, weight in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], weight), name

    caplog.clear()
    once = save_pruned(tiny_model(), tmp_path / "once", config=first)
    with caplog.at_level("WARNING", logger="optimum_prune"):
        PruningConfig.from_pretrained(once)
    assert "steps" not in caplog.text


def test_a_config_given_for_a_step_outside_prune_follows_the_recorded_steps_in_the_checkpoint_only(tmp_path):
    """A model pruned twice, then further by a training schedule: the checkpoint says so in order; the model in
    memory keeps its own record, so pruning it again lists what prune did."""
    model = tiny_model()
    first, second = PruningConfig(method="magnitude", sparsity=0.3), PruningConfig(method="magnitude", sparsity=0.4)
    prune(model, first)
    prune(model, second)
    before = (model.config.pruning_config, list(model.config.pruning_history))
    schedule_step = PruningConfig(method="magnitude", sparsity=0.6)
    output = save_pruned(model, tmp_path / "pruned", config=schedule_step)

    saved = json.loads((output / "config.json").read_text())
    assert [PruningConfig.from_dict(step) for step in saved["pruning_history"]] == [first, second, schedule_step]
    assert PruningConfig.from_dict(saved["pruning_config"]) == schedule_step
    assert PruningConfig.from_json_file(output / "pruning_config.json") == schedule_step
    assert (model.config.pruning_config, model.config.pruning_history) == before

    unrecorded = tiny_model()  # e.g. pruned by PruningCallback alone: no record, no history
    output = save_pruned(unrecorded, tmp_path / "unrecorded", config=schedule_step)
    saved = json.loads((output / "config.json").read_text())
    assert PruningConfig.from_dict(saved["pruning_config"]) == schedule_step and "pruning_history" not in saved
    assert not hasattr(unrecorded.config, "pruning_config")


def test_interrupted_save_keeps_previous_output(tmp_path, monkeypatch):
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    output = save_pruned(model, tmp_path / "pruned")
    before = {p.name: p.read_bytes() for p in output.iterdir()}

    def crash(directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, output)
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no staging directory left behind


def _left_by_a_killed_save(folder, age_s: float = 3600):
    """A save's folder as a killed save leaves it: unlocked (the kernel released its lock), and not new."""
    import os
    import time

    folder.mkdir(parents=True, exist_ok=True)
    os.utime(folder, (time.time() - age_s,) * 2)
    return folder


def test_folders_a_killed_save_left_are_removed_by_the_next_save_and_a_running_saves_are_not(tmp_path):
    """Each was a full hidden copy of the checkpoint that no later run removed. A running save holds its folder
    locked; one made a moment ago may not be locked yet."""
    import fcntl
    import os

    model = tiny_model()
    output = save_pruned(model, tmp_path / "pruned")
    (tmp_path / ".pruned.staging-x1").mkdir()
    (tmp_path / ".pruned.staging-x1" / "model.safetensors").write_bytes(b"half")
    _left_by_a_killed_save(tmp_path / ".pruned.staging-x1")
    _left_by_a_killed_save(tmp_path / ".pruned.old-x2" / "pruned")
    _left_by_a_killed_save(tmp_path / ".pruned.old-x2")
    running = _left_by_a_killed_save(tmp_path / ".pruned.staging-x3")
    _left_by_a_killed_save(tmp_path / ".pruned.staging-x4", age_s=0)
    descriptor = os.open(running, os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    try:
        save_pruned(model, output)
    finally:
        os.close(descriptor)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pruned.staging-x3", ".pruned.staging-x4", "pruned"]


def test_a_previous_output_a_save_killed_between_its_renames_left_aside_is_put_back(tmp_path, caplog):
    from optimum_prune.atomic_files import remove_leftovers

    model = tiny_model()
    output = save_pruned(model, tmp_path / "pruned")
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    output.rename(tmp_path / "retired")
    retired = _left_by_a_killed_save(tmp_path / ".pruned.old-x1")
    (tmp_path / "retired").rename(retired / "pruned")
    _left_by_a_killed_save(retired)
    with caplog.at_level("WARNING", logger="optimum_prune"):
        remove_leftovers(output)
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before and "put back" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]


def test_a_symbolic_link_named_like_a_leftover_and_what_it_points_to_stay(tmp_path):
    """It was followed: the folder it pointed to was put back as the output, then replaced and deleted."""
    import os

    victim = tmp_path / "elsewhere"
    (victim / "out").mkdir(parents=True)
    (victim / "out" / "precious.txt").write_text("user data")
    _left_by_a_killed_save(victim)
    (tmp_path / "work").mkdir()
    os.symlink(victim, tmp_path / "work" / ".out.old-planted")
    os.symlink(victim, tmp_path / "work" / ".out.staging-planted")
    save_pruned(tiny_model(), tmp_path / "work" / "out")
    assert (victim / "out" / "precious.txt").read_text() == "user data"
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [".out.old-planted", ".out.staging-planted", "out"]


def test_a_leftover_named_folder_another_user_made_is_neither_put_back_nor_removed(tmp_path):
    """In a shared directory, another user's ``.out.old-*/out`` was put back as the output, and the save then kept
    that folder's mode (0777: theirs to write in)."""
    import os

    planted = _left_by_a_killed_save(tmp_path / ".out.old-planted" / "out")
    planted.chmod(0o777)
    _left_by_a_killed_save(tmp_path / ".out.old-planted")
    for folder in (planted, planted.parent):
        os.chown(folder, 65534, 65534)  # the tests run as root: a foreign uid is a chown away
    save_pruned(tiny_model(), tmp_path / "out")
    (tmp_path / "fresh").mkdir()  # the mode the umask gives a new folder
    assert (tmp_path / "out").stat().st_uid == os.geteuid() and (tmp_path / "out").stat().st_mode == (tmp_path / "fresh").stat().st_mode
    assert planted.is_dir()


@pytest.mark.parametrize("failure", [OSError(errno.EIO, "Input/output error"), KeyboardInterrupt()])
def test_without_renameat2_a_failure_between_the_two_renames_puts_the_previous_output_back(tmp_path, monkeypatch, failure):
    """macOS, Windows, file systems without RENAME_EXCHANGE: the previous output moved aside stayed there, and --output
    was missing."""
    import os

    output = save_pruned(tiny_model(), tmp_path / "out")
    before = {path.name: path.read_bytes() for path in output.iterdir()}
    renamed, replace = [], os.replace

    def failing_second(source, target):
        renamed.append(target)
        if len(renamed) == 2:
            raise failure
        return replace(source, target)

    monkeypatch.setattr(atomic_files, "_RENAMEAT2", None)
    monkeypatch.setattr(atomic_files.os, "replace", failing_second)
    with pytest.raises(type(failure)):
        save_pruned(tiny_model(seed=1), output)
    monkeypatch.undo()
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_folders_are_left_alone_and_named_where_they_cannot_be_locked(tmp_path, monkeypatch, caplog):
    """NFS without lockd or Lustre without -o flock: a running save cannot be told from a killed one (and nothing
    said that a whole hidden copy of the checkpoint stayed)."""
    import errno

    def unsupported(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(atomic_files.fcntl, "flock", unsupported)
    leftover = _left_by_a_killed_save(tmp_path / ".out.staging-x1")
    with caplog.at_level("WARNING", logger="optimum_prune"):
        output = save_pruned(tiny_model(), tmp_path / "out")
    assert leftover.is_dir() and (output / "config.json").is_file()
    assert f"{leftover} may be a folder a killed save to {output} left" in caplog.text


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_an_output_swaps_it_whole_and_leaves_nothing_beside_it(tmp_path, monkeypatch, exchange):
    """In one step where Linux can (the output path is never missing); else in two, and a refused first rename
    (a read-only output) leaves no empty folder behind."""
    old, new = tmp_path / "out", tmp_path / "new"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    if exchange:
        probes = [tmp_path / ".a", tmp_path / ".b"]
        for probe in probes:
            probe.mkdir()
        supported = atomic_files._exchange(*probes)
        for probe in probes:
            probe.rmdir()
        if not supported:
            pytest.skip("this machine: its file system cannot exchange two paths")
    refused = lambda *args: (_ for _ in ()).throw(PermissionError("read-only"))  # noqa: E731
    with monkeypatch.context() as patched:
        if exchange:
            patched.setattr(atomic_files.os, "replace", refused)  # one step: no rename at all
        else:
            patched.setattr(atomic_files, "_exchange", lambda first, second: False)
        atomic_files.replace_directory(new, old)
    assert (old / "config.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]
    if not exchange:
        new.mkdir()
        monkeypatch.setattr(atomic_files, "_exchange", lambda first, second: False)
        monkeypatch.setattr(atomic_files.os, "replace", refused)
        with pytest.raises(PermissionError):
            atomic_files.replace_directory(new, old)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]


def test_a_previous_output_that_cannot_be_removed_leaves_the_save_done_with_a_warning(tmp_path, monkeypatch, caplog):
    """The swap had put the new output in place, then the save raised while removing the old one."""
    model = tiny_model()
    output = save_pruned(model, tmp_path / "pruned")
    removing = shutil.rmtree

    def refused(path, *args, **kwargs):
        if not kwargs.get("ignore_errors"):
            raise PermissionError(1, "Operation not permitted", str(path))
        return removing(path, *args, **kwargs)

    monkeypatch.setattr(atomic_files.shutil, "rmtree", refused)
    with caplog.at_level("WARNING", logger="optimum_prune"):
        save_pruned(model, output, config=PruningConfig(method="magnitude", sparsity=0.3))
    assert "could not be removed" in caplog.text and PruningConfig.from_pretrained(output).sparsity == 0.3


def test_a_mount_point_is_named_before_pruning(monkeypatch, tmp_path):
    monkeypatch.setattr(atomic_files.os.path, "ismount", lambda path: str(path) == str(tmp_path / "volume"))
    (tmp_path / "volume").mkdir()
    with pytest.raises(ValueError, match="volume is a mount point; saving replaces the whole directory by renaming"):
        atomic_files.check_replaceable(tmp_path / "volume", None, "output_dir")


def test_an_output_in_a_folder_this_user_cannot_write_is_named_before_pruning(tmp_path, monkeypatch):
    """It failed at the final rename (or after it, removing the previous output), after hours of offloaded pruning
    (the suite runs as root: access is faked)."""
    (tmp_path / "earlier").mkdir()
    (tmp_path / "a-file").write_text("")
    for folder, target in ((tmp_path, tmp_path / "a" / "out"), (tmp_path / "earlier", tmp_path / "earlier")):
        with monkeypatch.context() as patched:
            patched.setattr(atomic_files.os, "access", lambda path, mode, folder=folder: path != folder)
            with pytest.raises(ValueError, match=f"output_dir {target}: this user cannot write in {folder}, where"):
                atomic_files.check_replaceable(target, None, "output_dir")
    with pytest.raises(ValueError, match="a-file is a file, not a directory"):
        atomic_files.check_replaceable(tmp_path / "a-file" / "out", None, "output_dir")


def test_an_interrupted_save_to_a_new_nested_path_leaves_no_folder_it_made(tmp_path, monkeypatch):
    model = tiny_model()
    (tmp_path / "kept").mkdir()
    monkeypatch.setattr(model, "save_pretrained", lambda directory, **kwargs: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, tmp_path / "kept" / "runs" / "one" / "pruned")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())


@pytest.mark.parametrize("size", ["lots", "5GiB", "0GB", "-1GB", "infGB", 0, 0.5 - 1, float("inf"), None, True])
def test_a_shard_size_save_pretrained_cannot_read_is_named_before_writing(tmp_path, size):
    with pytest.raises(ValueError, match=f"max_shard_size {size!r}: give bytes"):
        save_pruned(tiny_model(), tmp_path / "pruned", max_shard_size=size)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("size", ["1.5GB", "200KB", 10**5, 1e5])
def test_every_shard_size_save_pretrained_reads_is_taken(tmp_path, size):
    """The tiny model's 608 kB: one shard under 1.5 GB, several within the limit (plus safetensors' header) under 200 kB / 100 kB (no
    tensor is larger), and they reload to the same weights."""
    model = tiny_model()
    save_pruned(model, tmp_path / "pruned", max_shard_size=size)
    shards = list((tmp_path / "pruned").glob("*.safetensors"))
    limit = 200_000 if size == "200KB" else 10**5 if size != "1.5GB" else None
    assert len(shards) == 1 if limit is None else len(shards) > 1 and max(p.stat().st_size for p in shards) <= limit + 10**4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))


def test_a_sparsified_model_is_refused_before_anything_is_written(tmp_path):
    """Its SparseLinear buffers are not weights transformers can load: the reload would be random, not an error.
    The same for PERP's adapters before merge_perp."""
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    save_pruned(model, tmp_path / "out")
    saved = sorted(path.name for path in (tmp_path / "out").iterdir())
    sparsify(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj is a SparseLinear, .*save the model before sparsify"):
        save_pruned(model, tmp_path / "out")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == saved
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_unmerged_perp_adapters_are_refused_and_saved_once_merged(tmp_path):
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    prepare_perp(model, PERPConfig(lora="mask", rank=4))
    with pytest.raises(ValueError, match=r"q_proj is a MaskLoRALinear, .*merge_perp\(model\)"):
        save_pruned(model, tmp_path / "out")
    assert not any(tmp_path.iterdir())
    merge_perp(model)
    save_pruned(model, tmp_path / "out")
    assert_stock_reload_matches(model, tmp_path / "out", token_windows(samples=1, seq_len=8), tmp_path)


def test_a_truncated_checkpoint_is_named_when_loaded(tmp_path, bpe_tokenizer):
    save_pruned(tiny_model(), tmp_path / "out", tokenizer=bpe_tokenizer)
    weights = tmp_path / "out" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    with pytest.raises(ValueError, match=r"out: the weights could not be read .*incomplete or corrupt: save or copy it again"):
        load_model(tmp_path / "out")


@pytest.mark.parametrize("kind", ["directory of other files", "project with a config.json", "file"])
def test_a_target_that_is_not_an_earlier_checkpoint_is_never_replaced(tmp_path, kind):
    """Saving replaces the whole target directory: a mistaken '.' must not delete a project."""
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("notes")
        message = "exists and is not a directory"
    else:
        target.mkdir()
        (target / "notes.txt").write_text("notes")
        if kind == "project with a config.json":
            (target / "config.json").write_text("{}")
        message = r"holds other files \((config\.json, )?notes\.txt\) and is not an earlier checkpoint"
    with pytest.raises(ValueError, match=message):
        save_pruned(tiny_model(), target)
    assert (target.read_text() if kind == "file" else (target / "notes.txt").read_text()) == "notes"
    assert [path.name for path in tmp_path.iterdir()] == ["target"]


@pytest.mark.parametrize(
    ("extra", "shown"),
    [({"checkpoint-500/optimizer.pt": "state", "runs/events": "logs"}, "checkpoint-500/, runs/"),  # a Trainer's output_dir
     ({".gitattributes": "*.safetensors lfs", "README.md": "card"}, ".gitattributes, README.md")],  # a clone of a model repo
)  # fmt: skip
def test_a_checkpoint_beside_other_data_is_never_replaced(tmp_path, extra, shown):
    target = tmp_path / "target"
    tiny_model().save_pretrained(target)
    for name, text in extra.items():
        (target / name).parent.mkdir(exist_ok=True)
        (target / name).write_text(text)
    before = sorted(str(path.relative_to(target)) for path in target.rglob("*"))
    with pytest.raises(ValueError, match=rf"holds a checkpoint and more \({re.escape(shown)}\); .* would delete them"):
        save_pruned(tiny_model(), target)
    assert sorted(str(path.relative_to(target)) for path in target.rglob("*")) == before


def _tokenizer_naming_as_vocab_file(model_dir, vocab_file):
    """model_dir's tokenizer, with its tokenizer_config.json naming ``vocab_file`` as its sentencepiece model (a fast
    tokenizer reads tokenizer.json, never that file)."""
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="LlamaTokenizerFast", vocab_file=str(vocab_file))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return load_model(model_dir)[1]


def test_a_vocab_file_outside_the_tokenizers_folder_is_not_copied_into_the_output(model_dir, tmp_path, caplog):
    """save_pretrained copied it whole as tokenizer.model: a file of the user's (an SSH key, /proc/self/environ with
    HF_TOKEN) rode along with the pruned model."""
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    tokenizer = _tokenizer_naming_as_vocab_file(model_dir, secret)
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        save_pruned(tiny_model(), tmp_path / "out", tokenizer=tokenizer)
    assert not (tmp_path / "out" / "tokenizer.model").exists()
    assert f"vocab_file is {secret}, outside its folder {model_dir}" in caplog.text
    assert tokenizer.vocab_file == str(secret)  # unset for the save only
    assert load_model(tmp_path / "out")[1].get_vocab() == tokenizer.get_vocab()


@pytest.mark.parametrize("linked", ["file", "folder"])
def test_a_vocab_file_linked_from_outside_the_tokenizers_folder_is_left_out_naming_where_it_leads(model_dir, tmp_path, caplog, linked):
    """The warning called the in-folder path outside the folder, and said nothing of the link or where it led."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "tokenizer.model").write_bytes(b"sentencepiece model")
    if linked == "file":
        (model_dir / "tokenizer.model").symlink_to(tmp_path / "shared" / "tokenizer.model")
        named = model_dir / "tokenizer.model"
    else:  # a folder of the checkpoint that links elsewhere
        (model_dir / "sub").symlink_to(tmp_path / "shared")
        named = model_dir / "sub" / "tokenizer.model"
    tokenizer = _tokenizer_naming_as_vocab_file(model_dir, named)
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        save_pruned(tiny_model(), tmp_path / "out", tokenizer=tokenizer)
    assert not (tmp_path / "out" / "tokenizer.model").exists()
    assert f"{named}, which links to {tmp_path / 'shared' / 'tokenizer.model'}, outside its folder" in caplog.text
    assert "put a copy of the file in the folder" in caplog.text


def test_a_vocab_file_in_the_tokenizers_folder_is_saved_with_it(model_dir, tmp_path):
    (model_dir / "tokenizer.model").write_bytes(b"sentencepiece model")
    tokenizer = _tokenizer_naming_as_vocab_file(model_dir, model_dir / "tokenizer.model")
    save_pruned(tiny_model(), tmp_path / "out", tokenizer=tokenizer)
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"sentencepiece model"


def test_an_earlier_output_with_its_tokenizer_is_replaced(tmp_path, bpe_tokenizer):
    save_pruned(tiny_model(), tmp_path / "out", tokenizer=bpe_tokenizer)
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    save_pruned(model, tmp_path / "out", tokenizer=bpe_tokenizer)
    assert (tmp_path / "out" / "pruning_config.json").is_file()
    reloaded = load_model(tmp_path / "out")[1]  # the tokenizer was saved with it
    assert reloaded is not None and reloaded.get_vocab() == bpe_tokenizer.get_vocab()


def test_an_earlier_output_whose_tokenizer_has_a_chat_template_is_replaced(tmp_path, bpe_tokenizer):
    """transformers writes the template as chat_template.jinja: a checkpoint file, not the user's."""
    bpe_tokenizer = copy.deepcopy(bpe_tokenizer)  # the session's tokenizer: other tests save it without a template
    bpe_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    save_pruned(tiny_model(), tmp_path / "out", tokenizer=bpe_tokenizer)
    assert (tmp_path / "out" / "chat_template.jinja").is_file()
    save_pruned(tiny_model(), tmp_path / "out", tokenizer=bpe_tokenizer)


@pytest.mark.parametrize("name", ["my_eval_results.json", "train.json", "adapter_model.safetensors", "adapter_config.json"])
def test_saving_over_an_earlier_checkpoint_keeps_files_no_checkpoint_writer_made(tmp_path, name):
    """Any *.json or *.safetensors counted as the checkpoint's: a user's results or LoRA adapter added beside it were
    deleted unasked by the next save there."""
    save_pruned(tiny_model(), tmp_path / "out")
    (tmp_path / "out" / name).write_text("mine")
    with pytest.raises(ValueError, match=rf"holds a checkpoint and more \({re.escape(name)}\); .* move them out first"):
        save_pruned(tiny_model(), tmp_path / "out")
    assert (tmp_path / "out" / name).read_text() == "mine"


def test_an_earlier_sharded_output_with_its_report_and_plot_is_replaced(tmp_path, bpe_tokenizer):
    """What the writers of a checkpoint make (shards and their index, the report, the scores plot, a processor's and a
    quantizer's files) is replaced with it."""
    model = tiny_model(num_hidden_layers=4)
    report = prune(model, {"method": "layers", "sparsity": 0.25, "num_calibration_samples": 4, "calibration_seq_len": 32},
                   calibration=token_windows())  # fmt: skip
    save_pruned(model, tmp_path / "out", tokenizer=bpe_tokenizer, report=report, max_shard_size="60KB")
    for name in ("preprocessor_config.json", "quanto_qmap.json", "entity_vocab.json", "Modelfile"):  # Modelfile: LLaMA-Factory's export
        (tmp_path / "out" / name).write_text("{}")
    assert {"layer_scores.png", "pruning_report.json", "model.safetensors.index.json"} <= {path.name for path in (tmp_path / "out").iterdir()}
    save_pruned(tiny_model(), tmp_path / "out")
    assert not (tmp_path / "out" / "layer_scores.png").exists()


def test_a_hidden_file_beside_a_checkpoint_is_not_taken_for_a_checkpoint_file(tmp_path):
    target = tmp_path / "target"
    tiny_model().save_pretrained(target)
    (target / ".notes.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds a checkpoint and more \(\.notes\.json\)"):
        save_pruned(tiny_model(), target)
    assert (target / ".notes.json").read_text() == "{}"


def test_a_record_an_earlier_version_wrote_without_format_version_is_saved_with_it(tmp_path):
    """format_version is how a later optimum-prune tells a record it cannot read: one saved without it would be
    read as that later version's own format."""
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    model.config.pruning_config = {"method": "magnitude", "sparsity": 0.5}  # as an earlier version recorded it
    saved = json.loads((save_pruned(model, tmp_path / "pruned") / "config.json").read_text())["pruning_config"]
    assert saved == PruningConfig(method="magnitude", sparsity=0.5).to_dict() and "format_version" in saved


def test_replacing_a_checkpoint_that_records_no_pruning_is_said(tmp_path, caplog):
    """E.g. an ONNX export (config.json beside model.onnx) given as the output by mistake: it goes, but not silently."""
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "config.json").write_text("{}")
    (tmp_path / "exported" / "model.onnx").write_bytes(b"onnx")
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        save_pruned(model, tmp_path / "exported")
    assert "holds a checkpoint that records no pruning (config.json, model.onnx)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        save_pruned(model, tmp_path / "exported")  # an earlier pruned output is replaced without a word
    assert "records no pruning" not in caplog.text


def test_the_saved_directory_is_as_readable_as_save_pretrained_makes_it(tmp_path):
    """The staging directory came from mkdtemp (mode 0700): other users and a serving container could not read it."""
    import os

    save_pruned(tiny_model(), tmp_path / "pruned")
    tiny_model().save_pretrained(tmp_path / "stock")
    assert (tmp_path / "pruned").stat().st_mode & 0o777 == (tmp_path / "stock").stat().st_mode & 0o777
    mask = os.umask(0o027)
    try:
        save_pruned(tiny_model(), tmp_path / "group")
    finally:
        os.umask(mask)
    assert (tmp_path / "group").stat().st_mode & 0o777 == 0o750
    (tmp_path / "group").chmod(0o700)  # a user's choice for this output: saving again keeps it, as save_pretrained does
    save_pruned(tiny_model(), tmp_path / "group")
    assert (tmp_path / "group").stat().st_mode & 0o777 == 0o700


def test_saved_weights_follow_the_umask_whatever_safetensors_writes(tmp_path, monkeypatch):
    """safetensors 0.8 (what a plain pip install resolves) creates its files 0600: model.safetensors was unreadable to
    the users the rest of the checkpoint, and prune_checkpoint's shards, are readable to."""
    import transformers.modeling_utils as modeling_utils

    monkeypatch.setattr(modeling_utils, "safe_save_file", owner_only(modeling_utils.safe_save_file))
    save_pruned(tiny_model(), tmp_path / "out")
    expected = atomic_files.new_file_mode()
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "out").iterdir()} == {f.name: expected for f in (tmp_path / "out").iterdir()}


def test_a_setgid_parent_gives_its_bit_as_save_pretrained_does(tmp_path):
    """The mode set on the staging folder cleared the bit it inherited: files left the project's group."""
    import stat

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)
    save_pruned(tiny_model(), shared / "pruned")
    tiny_model().save_pretrained(shared / "stock")
    assert (shared / "stock").stat().st_mode & stat.S_ISGID
    assert (shared / "pruned").stat().st_mode & 0o7777 == (shared / "stock").stat().st_mode & 0o7777


def test_the_source_reached_by_another_path_is_never_the_target(tmp_path):
    """A bind mount (or other case on a case-insensitive file system) passed the resolved-path comparison, and the
    dense source was replaced by its pruned copy."""
    import subprocess

    from optimum_prune.atomic_files import check_replaceable

    source, alias = tmp_path / "source", tmp_path / "alias"
    tiny_model().save_pretrained(source)
    alias.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(alias)], capture_output=True).returncode != 0:
        pytest.skip("this machine: bind mounts need root")
    try:
        with pytest.raises(ValueError, match="is the checkpoint being pruned"):
            check_replaceable(alias, source)
    finally:
        subprocess.run(["umount", str(alias)], check=True)


def test_a_quantized_output_is_replaced_by_the_next_save(tmp_path):
    """optimum-quanto's save wrote huggingface_hub's README.md model card, so the next save_pruned there was refused."""
    pytest.importorskip("optimum.quanto")
    from transformers import QuantoConfig

    from optimum_prune import compress

    for _ in range(2):
        model = tiny_model(hidden_size=128, intermediate_size=256)
        compress(model, [PruningConfig(method="magnitude", sparsity="2:4"), QuantoConfig(weights="int8")])
        save_pruned(model, tmp_path / "quantized")
    assert (tmp_path / "quantized" / "quanto_qmap.json").is_file() and not (tmp_path / "quantized" / "README.md").exists()


def test_a_symbolic_link_is_refused_and_left_as_it_is(tmp_path):
    """Replacing the link would leave the folder it points to with the old model, under the new name's nose."""
    save_pruned(tiny_model(), tmp_path / "v1")
    (tmp_path / "latest").symlink_to(tmp_path / "v1")
    with pytest.raises(ValueError, match=r"latest is a symbolic link \(to .*v1\); .* give the directory itself"):
        save_pruned(tiny_model(), tmp_path / "latest")
    assert (tmp_path / "latest").is_symlink() and not (tmp_path / "v1" / "pruning_config.json").exists()


@pytest.mark.parametrize("given", [".", "..", "{cwd}"])
def test_the_working_directory_is_never_the_target(tmp_path, monkeypatch, given):
    """Even empty, '.' would be renamed away under the running process (and its name is '')."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match="is the working directory or holds it; .* give a new one"):
        save_pruned(tiny_model(), given.format(cwd=work))
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    save_pruned(tiny_model(), "pruned")  # a new folder inside it is fine
    assert (work / "pruned" / "config.json").is_file()


def test_a_config_given_is_saved_beside_a_record_this_version_cannot_read(tmp_path):
    model = tiny_model()
    model.config.pruning_config = {"method": "a_later_method", "sparsity": 0.5}  # written by a newer optimum-prune
    given = PruningConfig(method="magnitude", sparsity=0.5)
    output = save_pruned(model, tmp_path / "pruned", config=given)
    saved = json.loads((output / "config.json").read_text())
    assert saved["pruning_history"] == [{"method": "a_later_method", "sparsity": 0.5}, given.to_dict()]


def test_a_step_of_a_method_not_registered_here_is_kept_as_recorded(tmp_path, caplog):
    """A checkpoint pruned with a plugin's method, reloaded where the plugin is not imported, still saves."""
    import logging

    model = tiny_model()
    prune(model, PruningConfig(method="magnitude"))
    model.config.pruning_config = {**model.config.pruning_config, "method": "column_norms"}
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        output = save_pruned(model, tmp_path / "pruned")
    assert "cannot read (PruningConfig.method 'column_norms' is not a registered pruning method" in caplog.text
    assert json.loads((output / "config.json").read_text())["pruning_config"]["method"] == "column_norms"
    assert not (output / "pruning_config.json").exists()


def test_two_saves_of_one_model_in_threads_write_their_own_records(tmp_path, monkeypatch):
    """A save writes its records into the model's config while it runs: a plain save beside one with compressed-tensors
    metadata took the other's quantization_config into its config.json."""
    import json
    import threading

    from optimum_prune import saving

    pytest.importorskip("compressed_tensors")
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    write, plain_writing = saving._write_checkpoint, threading.Event()

    def overlapping(model, *args):  # the metadata save waits (a second at most) for the plain one to write meanwhile
        if threading.current_thread().name == "metadata":
            plain_writing.wait(timeout=1.0)
        else:
            plain_writing.set()
        return write(model, *args)

    monkeypatch.setattr(saving, "_write_checkpoint", overlapping)
    threads = [
        threading.Thread(target=save_pruned, args=(model, tmp_path / "metadata"), kwargs={"compressed_tensors_metadata": True}, name="metadata"),
        threading.Thread(target=save_pruned, args=(model, tmp_path / "plain"), name="plain"),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" in json.loads((tmp_path / "metadata" / "config.json").read_text())
    assert not hasattr(model.config, "quantization_config")


def test_resaving_a_checkpoint_whose_record_sets_an_option_its_method_ignores_keeps_pruning_config_json(tmp_path, caplog):
    """Earlier versions recorded magnitude with moe_options.routing_weighted=False (ignored; refused since): the
    re-save dropped pruning_config.json, saying the registered method was "not registered here"."""
    import logging

    model = tiny_model()
    recorded = PruningConfig(method="magnitude", sparsity=0.5).to_dict()
    recorded["moe_options"] = {**recorded["moe_options"], "routing_weighted": False}
    model.config.pruning_config = recorded
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        output = save_pruned(model, tmp_path / "out")
    assert PruningConfig.from_pretrained(output) == PruningConfig(method="magnitude", sparsity=0.5)
    assert "sets moe_options.routing_weighted=False, which method 'magnitude' does not read" in caplog.text


def test_a_save_that_finds_its_new_output_made_by_another_meanwhile_replaces_it_whole(tmp_path, monkeypatch):
    """Between the check that the output is absent and the rename, another process's save put it there: the rename
    failed with a raw 'Directory not empty'; the last save now wins, as where the output existed before."""
    from pathlib import Path

    from optimum_prune.atomic_files import replace_directory

    finished, target = tmp_path / ".out.staging", tmp_path / "out"
    finished.mkdir()
    (finished / "config.json").write_text("ours")
    target.mkdir()
    (target / "config.json").write_text("theirs")
    (target / "model.safetensors").write_text("theirs")
    exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda path: False if path == target else exists(path))  # absent when checked
    replace_directory(finished, target)
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == ["config.json"] and (target / "config.json").read_text() == "ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_report_given_is_saved_as_json_beside_the_checkpoint(tmp_path):
    model = tiny_model()
    report = prune(model, PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows())
    output = save_pruned(model, tmp_path / "pruned", report=report)
    stored = json.loads((output / "pruning_report.json").read_text())
    assert stored["overall_sparsity"] == pytest.approx(report.overall_sparsity) and stored["method"] == "wanda"
    save_pruned(model, output)  # a folder holding one is a checkpoint to replace


@pytest.mark.parametrize("sparsity", ["2:4", 0.5])
def test_saving_a_model_whose_recorded_step_a_merge_filled_in_says_so(tmp_path, caplog, sparsity):
    """peft's own merge_and_unload fills the zeros of the LoRA targets (and a fine-tune without PruningCallback all of
    them): the checkpoint recorded the step as holding, silently."""
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=sparsity))
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        save_pruned(model, tmp_path / "kept")
    assert "as the model's last pruning step" not in caplog.text
    with torch.no_grad():
        for layer in model.model.layers:  # a merged update touching every weight, as a fine-tune's
            for linear in (layer.self_attn.q_proj, layer.mlp.down_proj, *([] if sparsity == "2:4" else [layer.mlp.up_proj, layer.mlp.gate_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj])):
                linear.weight.add_(1e-3)
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        save_pruned(model, tmp_path / "filled")
    expected = "6 linears no longer conform to 2:4 (e.g. model.layers.0.self_attn.q_proj)" if sparsity == "2:4" else "0.00% zeros where the step left 50%"
    assert f"the checkpoint records magnitude {sparsity} as the model's last pruning step, but {expected}" in caplog.text


@pytest.mark.parametrize("sparsity", ["2:4", 0.5])
def test_experts_left_dense_as_the_config_asks_are_no_undone_step(tmp_path, caplog, sparsity):
    from .adapters.test_moe import tiny_moe

    model = tiny_moe(num_local_experts=16, num_experts_per_tok=1)
    config = PruningConfig(method="wanda", sparsity=sparsity, moe_options={"unrouted_experts": "dense"})
    report = prune(model, config, calibration=token_windows(2, 4))
    assert report.unrouted  # some experts got no token: left dense
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        save_pruned(model, tmp_path / "out")
    assert "as the model's last pruning step" not in caplog.text
