"""Importing LLaMA-Factory where torchaudio is unusable.

LLaMA-Factory 0.9.5 imports ``torchaudio`` at module level in ``llamafactory.data.mm_plugin``
(for audio inputs only), so even text-only training fails to import without it. torchaudio
wheels exist only for the torch release they were built with, and often none matches the
installed torch (none does for torch 2.13 on CPU). When torchaudio cannot be imported we
register a stand-in module under that name, after transformers has recorded which optional
packages exist, so transformers still knows torchaudio is absent. Text pipelines never touch it;
anything that does use audio gets an ``ImportError`` saying what to install. LLaMA-Factory's own
files are not modified.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import logging
import sys
import types

from optimum_prune.dependencies import MissingDependency

logger = logging.getLogger(__name__)
INSTALL_HINT = (
    "install it with `pip install 'optimum-prune[llamafactory]' && pip install --no-deps llamafactory==0.9.5` "
    "(see README: its torchaudio/gradio/av dependencies are not needed for text)"
)
AUDIO_HINT = (
    "torchaudio is not importable here (LLaMA-Factory needs it only for audio inputs); install the torchaudio "
    "build matching your torch ({torch}) to use audio datasets"
)


class _MissingTorchaudio(types.ModuleType):
    """Stands in for torchaudio: importable, but any use raises a clear ImportError."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        import torch

        raise ImportError(f"torchaudio.{name}: " + AUDIO_HINT.format(torch=torch.__version__))


def ensure_torchaudio_importable() -> bool:
    """Make ``import torchaudio`` succeed; return True if the stand-in was installed."""
    if isinstance(sys.modules.get("torchaudio"), _MissingTorchaudio):
        return True
    import transformers.utils.import_utils  # noqa: F401  (records torchaudio's real availability first)

    try:
        importlib.import_module("torchaudio")
        return False
    except Exception as error:  # ImportError, or OSError from a torchaudio built for another torch
        sys.modules.pop("torchaudio", None)
        stand_in = _MissingTorchaudio("torchaudio", "stand-in registered by llamafactory_ext: " + str(error))
        stand_in.__spec__ = importlib.machinery.ModuleSpec("torchaudio", loader=None)
        sys.modules["torchaudio"] = stand_in
        logger.info("torchaudio unavailable (%s): registered a stand-in so LLaMA-Factory imports for text data", error)
        return True


def import_llamafactory() -> types.ModuleType:
    """``import llamafactory`` with the torchaudio stand-in when needed, and a clear error if it is missing."""
    ensure_torchaudio_importable()
    try:
        import llamafactory
        import llamafactory.data.mm_plugin  # noqa: F401  (the module that imports torchaudio)
    except ImportError as error:
        raise MissingDependency(f"llamafactory_ext needs LLaMA-Factory 0.9.5 ({error}); {INSTALL_HINT}") from error
    return llamafactory
