"""Files and folders written whole or not at all, and the folder checks every writer here shares.

A result is written to a hidden staging folder beside its target and renamed into place (``atomic_directory``,
``replace_directory``: one ``renameat2`` exchange where Linux has it), so an interrupted write leaves the previous
output and never a half-written one. A running writer holds its staging folder locked (``held_exclusively``); the
folders a killed one left are removed by the next write to the same target (``remove_leftovers``).
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import glob
import logging
import os
import shutil
import stat
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # not a POSIX system: no folder locks, so no concurrent run is detected and no leftover removed
    fcntl = None

logger = logging.getLogger(__name__)
SCORES_PLOT_NAME = "layer_scores.png"  # the structured methods' plot, which a checkpoint folder may hold


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging directory that replaces ``target`` only if the block completes."""
    target = Path(target).absolute()  # "." has no name to stage beside
    check_replaceable(target)
    created = [parent for parent in target.parents if not parent.exists()]  # removed again if the block fails
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    staging = claimed_folder(target, "staging")
    try:
        with held_exclusively(staging):  # while it is written: no other save takes it for a killed save's leftover
            yield staging
            give_output_mode(staging, target)
            replace_directory(staging, target)
        return  # staging is gone, or holds the replaced output that replace_directory could not remove (warned of)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created:  # innermost first; one something else wrote into meanwhile stays
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def exclusive_lock(descriptor: int, wait: bool = False) -> bool | None:
    """Take an exclusive lock on an open folder or file: True when taken, False when another process holds it, None
    where the system or file system has no such locks (no fcntl; NFS, whose exclusive locks need a file open for
    writing, which a folder cannot be; Lustre without ``-o flock``)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.EBADF, errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return True


@contextmanager
def held_exclusively(directory: Path, refusal: str | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on ``directory`` until the block ends: the kernel releases it if the process dies, and
    it moves with the folder when the folder is renamed. With ``refusal``, another process holding it is
    ``ValueError(refusal)``; without, this waits for it. Yields whether the lock is held (False where the file system
    has none)."""
    if fcntl is None:
        yield False
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        taken = exclusive_lock(descriptor, wait=refusal is None)
        if taken is False:
            raise ValueError(refusal)
        yield bool(taken)
    finally:
        os.close(descriptor)


def give_output_mode(folder: Path, target: Path) -> None:
    """Open the finished ``folder`` up as the output at ``target`` is: written 0700 (no other user plants a link in it
    meanwhile), it would leave the checkpoint unreadable to others. A setgid parent's bit (files in the project's
    group), which the folder inherited, stays; an output replaced keeps its own mode (a user's chmod), as
    save_pretrained writing into it does."""
    kept = stat.S_IMODE(target.stat().st_mode) if target.is_dir() else None
    folder.chmod(kept if kept is not None else (0o777 & ~_umask()) | (folder.stat().st_mode & stat.S_ISGID))


def private_folder(folder: Path) -> Path:
    """``folder`` made for this user alone (0700), or the one already there that only this user can write in: a folder
    another user made or can write in (a shared directory's, made before this run) could hold links they planted to
    redirect the writes, or files they forged."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
        return folder
    except FileExistsError:
        pass
    status = folder.lstat()
    if not stat.S_ISDIR(status.st_mode):  # lstat: a link to a folder is no folder either
        raise ValueError(f"{str(folder)!r} is a symbolic link or a file, not a folder this user made: remove it")
    if not _own(status):
        raise ValueError(f"{str(folder)!r} belongs to another user (uid {status.st_uid}), not to this one: remove it (or have them remove it)")
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError(
            f"{str(folder)!r} can be written by other users (mode {oct(stat.S_IMODE(status.st_mode))}), who could have "
            "planted files in it: `chmod go-w` it if no one else can have written in it (a run resumes from its layers), "
            "else remove it"
        )
    return folder


def new_file_mode() -> int:
    """The mode a file created now gets from the umask (what a writer that ignores it, safetensors 0.8's 0600, is set to)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process's file-creation mask: from /proc on Linux; elsewhere read by setting it (and setting it back at
    once: a file another thread creates meanwhile gets 022)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def check_replaceable(target: Path, source: str | os.PathLike | None = None, field: str = "the output directory") -> None:
    """Refuse a ``target`` whose replacement would delete more than an earlier output: saving here replaces the
    whole directory (atomically), where ``save_pretrained`` writes into it, so ``"."``, a home directory, a
    Trainer's output (checkpoints, logs), a clone of a model repository or the ``source`` checkpoint being
    pruned, given by mistake, would otherwise be lost. Empty directories and earlier outputs (``config.json``
    beside ``*.safetensors`` or ``*.onnx`` weights, and nothing but the files checkpoint writers make: no folders,
    none of the user's own) may go."""
    target = Path(target).absolute()
    if source is not None and Path(source).exists() and (
        Path(source).resolve() == target.resolve() or (target.exists() and os.path.samefile(source, target))
    ):  # samefile: another path to the same folder (a bind mount; other case on a case-insensitive file system)
        raise ValueError(
            f"{field} {target} is the checkpoint being pruned; saving replaces the whole directory, so the model it "
            "holds would be lost: give a new directory"
        )
    if Path.cwd().is_relative_to(target.resolve()):
        raise ValueError(
            f"{target} is the working directory or holds it; saving replaces the whole directory, so give a new one "
            "(e.g. ./pruned)"
        )
    if target.is_dir() and os.path.ismount(target):
        raise ValueError(
            f"{target} is a mount point; saving replaces the whole directory by renaming, which a mount point cannot "
            "be: give a folder inside it"
        )
    if target.is_symlink():
        raise ValueError(
            f"{target} is a symbolic link (to {os.readlink(target)}); saving replaces the whole directory, which would "
            "replace the link and leave what it points to as it was: give the directory itself, or a new one"
        )
    existing = next(folder for folder in (target.parent, *target.parent.parents) if folder.exists())
    if not existing.is_dir():
        raise ValueError(f"{field} {target}: {existing} is a file, not a directory; give a path inside a directory")
    for folder in (existing, target) if target.is_dir() else (existing,):  # the output's files are deleted from it
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(
                f"{field} {target}: this user cannot write in {folder}, where the output is staged, renamed into place "
                "and the previous one removed; give a directory you can write to"
            )
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory; give a directory (new, empty or an earlier checkpoint)")
    names = sorted(path.name for path in target.iterdir())
    earlier_output = "config.json" in names and any(name.endswith((".safetensors", ".onnx")) for name in names)
    if names and not earlier_output:
        raise ValueError(
            f"{target} holds other files ({shown_names(names)}) and is not an earlier checkpoint (config.json beside "
            "*.safetensors or *.onnx weights); saving replaces the whole directory, so give a new or empty one"
        )
    foreign = [f"{path.name}/" if path.is_dir() else path.name for path in sorted(target.iterdir()) if not is_checkpoint_file(path)]
    if foreign:
        raise ValueError(
            f"{target} holds a checkpoint and more ({shown_names(foreign)}); saving replaces the whole directory, which "
            "would delete them: give a new directory, or move them out first"
        )


# What save_pretrained, tokenizers, processors, optimum-quanto, GPTQ, optimum-onnx and this package write into a
# checkpoint, by name: any *.json or *.safetensors would take a user's own files (evaluation results, a LoRA adapter
# beside the model) for the checkpoint's, deleted unasked when it is replaced.
CHECKPOINT_NAMES = {
    "config.json", "generation_config.json", "pruning_config.json", "pruning_report.json", SCORES_PLOT_NAME,
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json", "quanto_qmap.json",
    "quantize_config.json", "quant_config.json", "ort_config.json", "merges.txt", "vocab.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "Modelfile",  # LLaMA-Factory's export writes Ollama's Modelfile
    "streaming-run.json", "streaming-notes.json",  # left in by an offloaded run interrupted after its final rename
}  # fmt: skip
CHECKPOINT_SUFFIXES = (".index.json", ".onnx", ".onnx_data", ".jinja", ".tiktoken")  # shard indexes, ONNX graphs, chat templates
# model.safetensors, save_pretrained's model-00001-of-00002.safetensors, offloaded pruning's model-layer-00000 and
# model-rest; vocabularies (vocab.json, entity_vocab.json ...); the licence files offloaded pruning copies from its source.
CHECKPOINT_PATTERNS = ("model.safetensors", "model-*.safetensors", "*vocab*.json", "LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*")


def is_checkpoint_file(path: Path) -> bool:
    """Whether ``path`` is a file some checkpoint writer makes (by name): what replacing a checkpoint may delete."""
    name = path.name
    known = name in CHECKPOINT_NAMES or name.endswith(CHECKPOINT_SUFFIXES) or any(fnmatch.fnmatchcase(name, pattern) for pattern in CHECKPOINT_PATTERNS)
    return path.is_file() and not name.startswith(".") and known


def in_checkpoint_store(file: Path, folder: Path) -> bool:
    """Whether ``file`` (followed through its links) lies in the checkpoint ``folder`` or in a store checkpoints are
    linked from: a Hugging Face cache's ``blobs`` (its snapshots, and ``local_dir`` downloads that link into it) or
    git-annex's objects. Anything else (a file in the user's home) is not the checkpoint's, and is not copied into an
    output, which may be shared."""
    target = file.resolve()
    if target.is_relative_to(folder.resolve()):
        return True
    parts = target.parts
    in_hub_cache = "blobs" in parts and any(part.startswith(("models--", "datasets--")) for part in parts)
    in_annex = any(parts[i : i + 3] == (".git", "annex", "objects") for i in range(len(parts)))
    return in_hub_cache or in_annex


def shown_names(names: list[str]) -> str:
    """The first three of ``names`` for a message, an ellipsis for the rest."""
    return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")


def replace_directory(finished: Path, target: Path) -> None:
    """Put the complete folder ``finished`` at ``target``, replacing whatever was there; ``target``
    never holds a mix of the two. Where Linux can swap the two folders in one step, ``target`` is never
    missing either (the old folder takes ``finished``'s name, then goes); elsewhere it is moved aside first
    into a locked folder, then removed: an error or Ctrl-C between the two renames puts it back, and a save
    killed there leaves it, for the next save to ``target`` to put back (the entry points call
    ``remove_leftovers`` before they write)."""
    if not target.exists() and _placed(finished, target):
        return
    if _exchange(finished, target):
        _remove_replaced(finished)
    else:
        retired = claimed_folder(target, "old")
        moved = retired / target.name
        with held_exclusively(retired):
            try:
                os.replace(target, moved)
                os.replace(finished, target)
            except BaseException:  # the previous output goes back, not left aside with no output in its place
                if moved.exists() and not target.exists():
                    os.replace(moved, target)
                with suppress(OSError):
                    retired.rmdir()
                raise
            _remove_replaced(retired)


def _placed(finished: Path, target: Path) -> bool:
    """Rename ``finished`` to the absent ``target``; False where another save put a folder there meanwhile (replaced
    then like any existing one: the last save wins, whole)."""
    try:
        os.replace(finished, target)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST) and target.is_dir():
            return False
        raise
    return True


def claimed_folder(target: Path, kind: str) -> Path:
    """A new hidden folder beside ``target`` for a save's work (``.{name}.{kind}-*``), which the save locks at once."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-", dir=target.parent))


class InterruptedAfterReplacing(KeyboardInterrupt):
    """Ctrl-C while the previous output was removed (seconds for a large checkpoint): the new one is in place, whole."""


def _remove_replaced(folder: Path) -> None:
    """The previous output, once replaced: the save succeeded, so files this user may not delete only warn, and an
    interruption (Ctrl-C, or SIGTERM as ``exiting_on_sigterm``'s SystemExit) finishes removing it, then Ctrl-C says
    the save was done."""
    try:
        shutil.rmtree(folder)
    except OSError as error:
        logger.warning("the previous output, moved to %s, could not be removed (%s); delete it", folder, error)
    except (KeyboardInterrupt, SystemExit) as interrupt:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(interrupt, SystemExit):
            raise
        raise InterruptedAfterReplacing() from interrupt


# A folder this young may not be locked yet (made, then locked): never taken for a killed process's.
LEFTOVER_AGE_S = 60


def remove_leftovers(target: Path) -> None:
    """Remove the folders beside ``target`` that killed saves left (each can be a whole checkpoint). A retired
    previous output whose replacement never arrived goes back to ``target`` first."""
    for kind in ("old", "staging"):
        for path in unheld_leftovers(target.parent, f".{target.name}.{kind}-", f"save to {target}"):
            retired = path / target.name
            if kind == "old" and not target.exists() and retired.is_dir() and not retired.is_symlink() and _own(retired.lstat()):
                os.replace(retired, target)
                logger.warning("put back %s, which a save killed before it was replaced left in %s", target, path)
            shutil.rmtree(path, ignore_errors=True)


def unheld_leftovers(parent: Path, prefix: str, writer: str) -> Iterator[Path]:
    """This user's folders ``prefix*`` in ``parent`` that killed processes left, each yielded while locked here: a
    running ``writer`` holds its folder locked (``held_exclusively``), so an unlocked one older than a minute is a
    leftover. None is yielded where folders cannot be locked (each is named in a warning). A symbolic link named like
    a leftover is no one's (the writers make real folders): it and what it points to stay, as does a folder of another
    user's (in a shared directory, one planted to be put back as an output)."""
    for path in sorted(parent.glob(glob.escape(prefix) + "*")):
        try:
            status = path.lstat()
            if not stat.S_ISDIR(status.st_mode) or not _own(status) or time.time() - status.st_mtime < LEFTOVER_AGE_S:
                continue
            descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # removed meanwhile, or not ours to open
            continue
        try:
            taken = exclusive_lock(descriptor)
            if taken is None:  # a running writer's folder cannot be told from a killed one's: the user decides
                logger.warning(
                    "%s may be a folder a killed %s left (folders cannot be locked here to tell): delete it if no %s "
                    "is running", path, writer, writer,
                )  # fmt: skip
            if taken:
                yield path
        finally:
            os.close(descriptor)


def _own(status: os.stat_result) -> bool:
    """Whether this user owns what ``status`` describes (everything does where there are no owners: Windows)."""
    return not hasattr(os, "geteuid") or status.st_uid == os.geteuid()


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _renameat2() -> Any:
    """glibc's ``renameat2`` (2.28+), or None where there is none."""
    if sys.platform != "linux":
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_RENAMEAT2 = _renameat2()


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (``renameat2(RENAME_EXCHANGE)``); False where the system or file system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``path`` whole or not at all: a run killed mid-write leaves the previous file."""
    _write_atomic(Path(path), text, "w")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """``write_text_atomic`` for bytes (a rendered figure)."""
    _write_atomic(Path(path), data, "wb")


def _write_atomic(path: Path, content: str | bytes, mode: str) -> None:
    """Through ``new_temporary`` and a rename, which replaces a link planted as ``path``, never what it points to."""
    temporary, descriptor = new_temporary(path)
    try:
        with os.fdopen(descriptor, mode, encoding="utf-8" if mode == "w" else None) as file:
            file.write(content)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def new_temporary(path: Path) -> tuple[Path, int]:
    """A new file ``.{name}.tmp`` beside ``path`` to write it through, open for writing, with the umask's mode. One a
    killed write left goes first (under one name, a leftover is replaced, never piled up); the file is then created
    exclusively, so a link planted under its name is never written through."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    return temporary, os.open(temporary, flags, 0o666)
