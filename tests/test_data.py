import lzma
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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
