import lzma
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variable", ["OPTIMUM_PRUNE_CACHE", "XDG_CACHE_HOME"])
def test_the_cache_folder_variables_take_a_tilde_and_need_no_home_directory(monkeypatch, tmp_path, variable):
    """XDG_CACHE_HOME set still looked up the home directory (a container's user may have none), and a quoted
    "~/..." became a folder named "~" in the working directory."""
    from optimum_prune.models import cache_root

    monkeypatch.delenv("OPTIMUM_PRUNE_CACHE", raising=False)
    monkeypatch.setenv(variable, "~/cache")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == (tmp_path / "cache" / "optimum_prune" if variable == "XDG_CACHE_HOME" else tmp_path / "cache")
    monkeypatch.setenv(variable, str(tmp_path / "elsewhere"))

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert cache_root().is_relative_to(tmp_path / "elsewhere")


def test_a_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    """The XDG spec calls a relative path invalid: it gave every working directory its own 517 MB conversion."""
    from optimum_prune.models import cache_root

    monkeypatch.delenv("OPTIMUM_PRUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "cache")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "optimum_prune"


def test_shipped_text_is_reproducible_from_gensim():
    pytest.importorskip("gensim")
    pytest.importorskip("mwparserfromhell")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from build_wikipedia_text import TARGET, build
    finally:
        sys.path.pop(0)
    assert lzma.decompress(TARGET.read_bytes()).decode("utf-8") == build()


def test_processes_converting_the_default_model_together_convert_it_once(tmp_path, monkeypatch, bpe_tokenizer):
    """Both converted and the second replaced the first one's directory while it was loading it."""
    import copy
    import threading
    import time

    from optimum_prune import models

    from .conftest import tiny_model

    monkeypatch.setenv("OPTIMUM_PRUNE_CACHE", str(tmp_path / "cache"))
    conversions = []

    def slow_conversion(_path, _dtype):
        conversions.append(1)
        time.sleep(0.5)
        return tiny_model(), copy.deepcopy(bpe_tokenizer)  # the conversion sets its special tokens: not the shared fixture's

    monkeypatch.setattr(models, "load_gguf", slow_conversion)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(models.default_model_path())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(conversions) == 1 and len(paths) == 2 and paths[0] == paths[1] and (paths[0] / "config.json").is_file()


def test_the_cache_drops_an_earlier_conversions_copy_of_the_gguf(tmp_path, monkeypatch, bpe_tokenizer):
    """Earlier conversions saved the GGUF as tokenizer.model (see saving.drop_gguf_copy); a real sentencepiece model stays."""
    import copy

    from optimum_prune import models

    from .conftest import tiny_model

    monkeypatch.setenv("OPTIMUM_PRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "load_gguf", lambda _path, _dtype: (tiny_model(), copy.deepcopy(bpe_tokenizer)))
    copy_of_gguf = models.default_model_path() / "tokenizer.model"
    copy_of_gguf.write_bytes(b"GGUF" + bytes(64))
    assert models.default_model_path() == copy_of_gguf.parent and not copy_of_gguf.exists()
    copy_of_gguf.write_bytes(b"\n\x0esentencepiece")
    models.default_model_path()
    assert copy_of_gguf.exists()


def test_a_lock_file_another_user_made_or_a_file_system_without_locks_still_converts(tmp_path, monkeypatch, bpe_tokenizer):
    """A shared cache's lock file this user cannot write is opened read-only; where the file system refuses that lock
    (NFS needs a file open for writing), the conversion goes on unlocked instead of failing."""
    import copy
    import errno
    import fcntl
    import os

    from optimum_prune import models

    from .conftest import tiny_model

    monkeypatch.setenv("OPTIMUM_PRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "load_gguf", lambda _path, _dtype: (tiny_model(), copy.deepcopy(bpe_tokenizer)))
    opened = os.open

    def not_writable(path, flags, *args):
        if flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return opened(path, flags, *args)

    def read_only_refused(file, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(models.os, "open", not_writable)
    (tmp_path / "cache").mkdir()
    lock = tmp_path / "cache" / f".{models.DEFAULT_MODEL_NAME.lower()}-{models._default_distribution().version}-fp32.lock"
    lock.touch()
    monkeypatch.setattr(fcntl, "flock", read_only_refused)
    assert (models.default_model_path() / "config.json").is_file()


def test_an_unwritable_default_model_cache_is_one_error_line_naming_the_variable(tmp_path, monkeypatch, capsys):
    """A read-only (or missing, as `nobody`'s /nonexistent) home ended `optimum-prune` without --model in a raw
    PermissionError traceback from the cache folder's mkdir, naming neither OPTIMUM_PRUNE_CACHE nor --model."""
    import errno

    from optimum_prune.cli import main

    read_only = tmp_path / "home"
    monkeypatch.setenv("OPTIMUM_PRUNE_CACHE", str(read_only / ".cache" / "optimum_prune"))
    mkdir = Path.mkdir

    def refused_under_home(self, *args, **kwargs):  # root ignores chmod: refuse as a read-only home would
        if self.is_relative_to(read_only):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused_under_home)
    with pytest.raises(SystemExit) as exit_info:
        main(["--method", "magnitude", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("optimum-prune: error: ") and err.count("\n") == 1
    assert "cannot be written (Permission denied): set OPTIMUM_PRUNE_CACHE" in err and not (tmp_path / "out").exists()


def test_a_killed_conversions_staging_folder_is_removed_by_the_next_use(tmp_path, monkeypatch):
    """A conversion killed while saving (the OOM killer) left its staging folder (255 MB); the rerun converted beside
    it and every later use returned early, so nothing removed it."""
    import os
    import time

    from optimum_prune import models

    monkeypatch.setenv("OPTIMUM_PRUNE_CACHE", str(tmp_path))
    target = tmp_path / f"{models.DEFAULT_MODEL_NAME.lower()}-{models._default_distribution().version}-fp32"
    target.mkdir()
    (target / "config.json").write_text("{}")  # the conversion the rerun finished
    leftover = tmp_path / f".{target.name}.staging-k1lled00"  # the killed one's: unlocked, an hour old
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(bytes(1024))
    an_hour_ago = time.time() - 3600
    os.utime(leftover, (an_hour_ago, an_hour_ago))
    assert models.default_model_path() == target and not leftover.exists()


@pytest.mark.parametrize("damaged", ["model.safetensors", "tokenizer.json"])
def test_a_damaged_default_model_cache_says_to_delete_it(tmp_path, monkeypatch, bpe_tokenizer, damaged):
    """A cut-off cached file said 'save or copy it again' (tokenizer: 'tokenizer.save_pretrained'): the user saved no
    such checkpoint, and only deleting the folder (converted again) repairs it."""
    import copy

    from optimum_prune import models

    from .conftest import tiny_model

    monkeypatch.setenv("OPTIMUM_PRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "load_gguf", lambda _path, _dtype: (tiny_model(), copy.deepcopy(bpe_tokenizer)))
    file = models.default_model_path() / damaged
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(ValueError) as error:
        models.load_default_model()
    message = str(error.value)
    assert f"default model's converted copy in {str(file.parent)!r} is damaged" in message
    assert "delete that folder" in message and "save" not in message


def test_a_dtype_the_default_model_cannot_load_in_is_not_blamed_on_the_cache():
    """Any ValueError was read as a damaged cache: "delete that folder" for load_default_model(dtype=torch.int8)."""
    import torch

    from optimum_prune.models import load_default_model

    with pytest.raises(ValueError, match=r"^dtype torch.int8: the model loads in a floating-point dtype"):
        load_default_model(dtype=torch.int8)
