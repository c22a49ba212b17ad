"""What ``llamafactory-prune train`` runs: pruning through LLaMA-Factory's data pipeline, then LLaMA-Factory's own
training and the merge, with the sparsity kept at every step (export and chat: ``export.py``, ``interactive.py``).

Layout of ``output_dir`` for ``stage: sft`` / ``pt`` with a ``pruning:`` section::

    output_dir/pruned/   the pruned model LLaMA-Factory trains (reused on a rerun with the same config)
    output_dir/          LLaMA-Factory's usual output (the LoRA adapter, or the full model)
    export_dir or output_dir/merged/   LoRA runs: the adapter merged with the sparsity kept
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM

from optimum_prune import SparsityMasks, merge_lora_preserving_sparsity, prune, prune_checkpoint, save_pruned
from optimum_prune.atomic_files import check_replaceable
from optimum_prune.calibration import sample_windows
from optimum_prune.config import PruningConfig, readable_step
from optimum_prune.dependencies import MissingDependency
from optimum_prune.models import load_causal_lm
from optimum_prune.saving import DEFAULT_SHARD_SIZE
from optimum_prune.streaming import INDEX_NAME, checkpoint_fingerprint
from optimum_prune.structure.loading import records_layer_shapes

from .checkpoints import CHECKPOINT_FILES, is_pruned_checkpoint, model_files, snapshot
from .compat import import_llamafactory
from .config import PruningSection, in_yaml_terms, model_loading_kwargs
from .distill import distilling_trainers
from .patches import loading_sparsity_metadata_as_plain, merges_keeping_zeros
from .sections import TRAINING_STAGES
from .training import TrainingSections

logger = logging.getLogger(__name__)
PRUNED_SUBDIR = "pruned"
MERGED_SUBDIR = "merged"
# Pruned (and saved) in full precision, in memory or from disk alike; LLaMA-Factory casts for training as its YAML says.
PRUNING_DTYPE = torch.float32
# LLaMA-Factory's `infer_dtype`, which its export honours, for the merge after training ("auto": the pruned model's).
MERGED_DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def run_train(args: Mapping[str, Any], section: PruningSection | None, training: TrainingSections = TrainingSections()) -> None:
    """``llamafactory-prune train``: ``stage: prune``, or prune → LLaMA-Factory training (as its
    ``distill:``, ``perp:`` and ``expert_dropping:`` sections say) → merge."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "llamafactory-prune is running as one of several torchrun ranks: each would prune and save on its own. "
            "Run it as a single process and set FORCE_TORCHRUN=1 (and NPROC_PER_NODE): it prunes once, then launches "
            "the training ranks itself"
        )
    if not args.get("model_name_or_path"):
        raise ValueError("`model_name_or_path` is required")
    # output_dir as TrainingArguments reads it: the pruned model must go where training then looks; export_dir alike
    args = {**args, **{key: os.path.expanduser(str(args[key])) for key in ("output_dir", "export_dir") if args.get(key)}}
    name = str(args["model_name_or_path"])
    if (os.path.isabs(name) or name.startswith(("./", "../", "~"))) and not Path(name).expanduser().exists():
        raise ValueError(f"model_name_or_path: {name} does not exist (a path, not a Hub repository id); fix the path")
    stage = args.get("stage")
    if stage == "prune":
        if section is None:
            raise ValueError("stage: prune needs a `pruning:` section (method, sparsity, ...)")
        if not args.get("output_dir"):
            raise ValueError("stage: prune needs `output_dir`, where the pruned model is saved")
        check_replaceable(args["output_dir"], args["model_name_or_path"], "output_dir")  # before loading and pruning
        prune_and_save(args, section, Path(args["output_dir"]), read_calibration(args, section))
        return
    if section is None:
        # Training a checkpoint pruned earlier (e.g. by stage: prune) must keep its zeros too.
        _delegate_training(dict(args), is_pruned_checkpoint(model_files(args)), training)
        return
    if stage not in TRAINING_STAGES:
        raise ValueError(f"a `pruning:` section works with stage: prune, pt or sft; got stage: {stage!r}")
    if not args.get("output_dir"):
        raise ValueError("`output_dir` is required")
    output_dir = Path(args["output_dir"])
    pruned_dir = output_dir / PRUNED_SUBDIR
    merged_dtype = args.get("infer_dtype", "auto")
    if merged_dtype not in MERGED_DTYPES:  # checked before hours of training, not at the merge after them
        raise ValueError(f"infer_dtype must be one of {', '.join(MERGED_DTYPES)}, got {merged_dtype!r}")
    if args.get("adapter_name_or_path"):
        raise ValueError(
            f"adapter_name_or_path: {args['adapter_name_or_path']} with a `pruning:` section: the adapter was trained on the "
            "dense model, and LLaMA-Factory would merge it into the pruned one filling its zeros; merge it first "
            "(llamafactory-cli export), then prune the merged model"
        )
    merges = args.get("do_train") and args.get("finetuning_type", "lora") == "lora"
    merged = Path(args.get("export_dir") or output_dir / MERGED_SUBDIR)
    if merges:  # before hours of training, not at the merge after them
        _check_apart(merged, output_dir)
        check_replaceable(merged, args["model_name_or_path"], "export_dir" if args.get("export_dir") else "the merged model's directory")
    calibration = read_calibration(args, section)
    source = calibration.source
    differs = _differs_from_pruned(pruned_dir, source, section.config)
    if differs is None:
        logger.info("reusing the pruned model in %s (same model, calibration tokens and pruning config)", pruned_dir)
    else:
        _check_no_stale_checkpoints(args, output_dir, differs)
        prune_and_save(args, section, pruned_dir, calibration, source)
    # LLaMA-Factory trains the embeddings of the tokens it added (LoRA: as modules to save); the pruned model has them already.
    resized = {"resize_vocab": True} if calibration.model_args.resize_vocab else {}
    _delegate_training({**args, "model_name_or_path": str(pruned_dir), **resized}, True, training)
    if merges:
        merge_adapter(pruned_dir, output_dir, merged, MERGED_DTYPES[merged_dtype], f"{args.get('export_size', 5)}GB")


# LLaMA-Factory checks its arguments for the run it trains; parsing them to read the calibration data,
# its evaluation, prediction, dataset-mixing and launcher settings would refuse or change that reading
# (a tokenized_path would even replace the calibration data), so they are left out.
_NOT_FOR_CALIBRATION = (
    "eval_dataset", "val_size", "do_eval", "do_predict", "eval_strategy", "predict_with_generate", "load_best_model_at_end",
    "metric_for_best_model", "tokenized_path", "interleave_probs", "mix_strategy", "deepspeed", "fsdp", "fsdp_config",
)
_WHOLE_DOCUMENT = 2**31 - 1  # a plain-text record's token limit: none (the tokenizer's truncation takes an int)
_SFT_ONLY = ("train_on_prompt", "mask_history")  # refused by LLaMA-Factory outside stage: sft


@dataclass
class Calibration:
    """What pruning reads from a YAML: the model's loading arguments, its tokenizer, and the calibration
    windows sampled from LLaMA-Factory's own tokenisation of the data (None for data-free methods)."""

    model_args: Any
    tokenizer: Any
    windows: torch.Tensor | None
    model_files: str
    processor: Any = None  # a vision-language model's, which its pruned copy keeps

    @property
    def source(self) -> dict[str, Any]:
        """What a pruned model came from, recorded in its ``config.json``: a rerun reuses it only when the
        model (its files, not only its name) and the exact calibration tokens are the same (whatever template,
        system prompt or limit made them)."""
        tokens = None if self.windows is None else hashlib.sha256(self.windows.numpy().tobytes()).hexdigest()
        return {
            "model_name_or_path": self.model_args.model_name_or_path,
            "model_revision": self.model_args.model_revision,
            "model_files": self.model_files,
            "calibration_tokens_sha256": tokens,
        }


def read_calibration(args: Mapping[str, Any], section: PruningSection) -> Calibration:
    """The tokenizer and calibration windows, read through LLaMA-Factory's own data pipeline."""
    import_llamafactory()
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    config = section.config
    calibration_stage = section.calibration_stage
    parse_args = {
        **{key: value for key, value in args.items() if key not in _NOT_FOR_CALIBRATION},
        **({} if calibration_stage == "sft" else dict.fromkeys(_SFT_ONLY, False)),
        "use_cpu": True,  # only reads data, in this one process: several GPUs would count as an unlaunched DataParallel run
        "stage": calibration_stage,
        "do_train": config.requires_calibration,  # LLaMA-Factory then requires and loads a dataset
        "dataset": section.calibration_dataset,
        "cutoff_len": config.calibration_seq_len,
        "overwrite_output_dir": True,  # this parse only reads data; it writes nothing there
        "streaming": False,  # the calibration tokens are gathered into one stream
        # Packed SFT examples are padded to full length: the pads would be calibrated on (the stream packs them anyway).
        "packing": False,
        "neat_packing": False,
    }
    model_args, data_args, training_args, _, _ = get_train_args(parse_args)
    if calibration_stage == "pt":
        # Unpacked, LLaMA-Factory cuts each text at cutoff_len: a document's tail would never be calibrated on. Set
        # after parsing, which made cutoff_len the tokenizer's model_max_length too (that one stays as it was).
        data_args.cutoff_len = _WHOLE_DOCUMENT
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    windows = None
    if config.requires_calibration:
        dataset = get_dataset(template, model_args, data_args, training_args, calibration_stage, **tokenizer_module)
        tokens = torch.tensor(list(chain.from_iterable(dataset["train_dataset"]["input_ids"])), dtype=torch.long)
        with _errors_naming_the_section():  # a dataset shorter than one window
            windows = sample_windows(tokens, config.num_calibration_samples, config.calibration_seq_len, config.seed)
    fingerprint = _model_fingerprint({**args, "model_name_or_path": model_args.model_name_or_path})
    return Calibration(model_args, tokenizer, windows, fingerprint, tokenizer_module.get("processor"))


def _model_fingerprint(args: Mapping[str, Any]) -> str:
    """A local model's ``checkpoint_fingerprint``; a Hub model's snapshot commit, which names every file."""
    files = model_files(args)
    return checkpoint_fingerprint(files) if Path(str(args["model_name_or_path"])).is_dir() else f"commit {files.name}"


def prune_and_save(
    args: Mapping[str, Any], section: PruningSection, target: Path, calibration: Calibration, source: Mapping[str, Any] | None = None
) -> Path:
    """Prune on ``calibration`` and save atomically (noting ``source``, ``calibration.source``, when given)."""
    with _errors_naming_the_section():
        return _prune_and_save(args, section, target, calibration, source)


@contextmanager
def _errors_naming_the_section() -> Iterator[None]:
    """The checks that need the model or the data (ignore patterns, widths, layer counts, the calibration's length)
    name ``PruningConfig.<field>``; this YAML's user wrote ``pruning.<field>``."""
    try:
        yield
    except (ValueError, RuntimeError, MissingDependency) as error:
        if "PruningConfig." not in str(error):  # not about the section (an output folder, CUDA memory): as it is
            raise
        try:
            renamed = type(error)(in_yaml_terms(str(error)))
        except TypeError:  # a class built otherwise
            renamed = (RuntimeError if isinstance(error, RuntimeError) else ValueError)(in_yaml_terms(str(error)))
        raise renamed from error


def _prune_and_save(
    args: Mapping[str, Any], section: PruningSection, target: Path, calibration: Calibration, source: Mapping[str, Any] | None
) -> Path:
    config = section.config
    device = "cuda" if torch.cuda.is_available() else None
    if section.offload == "disk":
        if calibration.model_args.resize_vocab:
            raise ValueError(
                "pruning.offload: disk with tokens the YAML adds (add_tokens, add_special_tokens or resize_vocab): the "
                "embeddings must grow for them first, which offloaded pruning does not do; prune in memory"
            )
        # Offloaded pruning reads the checkpoint's files: a Hub model is downloaded first, as from_pretrained would.
        checkpoint = snapshot({**args, "model_name_or_path": calibration.model_args.model_name_or_path}, CHECKPOINT_FILES)
        prune_checkpoint(
            checkpoint, target, config, calibration=calibration.windows,
            tokenizer=calibration.tokenizer, device=device, dtype=PRUNING_DTYPE, activation_device=section.activation_device,
        )  # fmt: skip
        if source is not None:
            _record_source(target, source)
        logger.info("saved the pruned model in %s", target)
        return target
    model = load_causal_lm(calibration.model_args.model_name_or_path, dtype=PRUNING_DTYPE, **model_loading_kwargs(args))
    _resize_vocabulary(model, calibration.model_args, calibration.tokenizer)
    if source is not None:
        model.config.pruned_from = source
    report = prune(model, config, calibration=calibration.windows, device=device, activation_device=section.activation_device)
    save_pruned(model, target, tokenizer=calibration.processor or calibration.tokenizer, config=config, report=report)
    logger.info("saved the pruned model in %s (its staging folder, named in the lines above, was renamed to it)", target)
    return target


def _resize_vocabulary(model: torch.nn.Module, model_args: Any, tokenizer: Any) -> None:
    """Tokens the YAML adds (``add_tokens``, ``add_special_tokens``; LLaMA-Factory then sets ``resize_vocab``)
    get their embedding rows as LLaMA-Factory's loader gives them, before they are calibrated on and saved:
    the pruned model's tokenizer holds them, so the training run would add (and resize for) none."""
    if model_args.resize_vocab:
        from llamafactory.model.model_utils.embedding import resize_embedding_layer

        descriptions = getattr(model_args, "_special_token_descriptions", None)
        resize_embedding_layer(model, tokenizer, new_special_tokens_config=descriptions, init_special_tokens=model_args.init_special_tokens)


def _record_source(checkpoint: Path, source: Mapping[str, Any]) -> None:
    """Note in ``config.json`` which model was pruned (what ``_already_pruned`` compares), atomically."""
    from optimum_prune.atomic_files import write_text_atomic

    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    write_text_atomic(checkpoint / "config.json", json.dumps({**config, "pruned_from": source}, indent=2, sort_keys=True) + "\n")


CHANGED = "the model, calibration data or pruning section changed"


def _differs_from_pruned(pruned_dir: Path, source: Mapping[str, Any], config: PruningConfig) -> str | None:
    """Why the pruned model in ``pruned_dir`` cannot be reused for this run (None: it can)."""
    try:
        recorded = json.loads((pruned_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return CHANGED
    if not isinstance(recorded, dict):
        return CHANGED
    same_config = readable_step(recorded.get("pruning_config")) == config  # this stage's step: the last one recorded
    pruned_from = recorded.get("pruned_from")
    if same_config and pruned_from == source:
        unreadable = _unreadable_weights(pruned_dir)
        if unreadable is None:
            return None
        # ours, made from what the record names: pruning again repairs it (LLaMA-Factory's loader named no file)
        logger.warning("the pruned model in %s cannot be reused, %s: pruning again", pruned_dir, unreadable)
        return f"its weights are damaged: {unreadable}"
    without_files = {key: value for key, value in source.items() if key != "model_files"}
    # earlier records: a mapping without the files' fingerprint, or before that the model's path alone
    earlier = pruned_from == without_files or pruned_from == source["model_name_or_path"]
    if same_config and earlier:
        return (
            "an earlier optimum-prune recorded where it came from (pruned_from) without the model files' fingerprint (the "
            "oldest records: the model's path alone), so whether the model and data are the same cannot be told"
        )
    return CHANGED


def _check_apart(merged: Path, output_dir: Path) -> None:
    """The merged model replaces its folder whole once training is done: one that is ``output_dir`` or holds it would
    take the run's adapter and checkpoints with it (and is refused then, after the training)."""
    merged, output_dir = merged.absolute(), output_dir.absolute()
    if merged == output_dir or merged in output_dir.parents:
        raise ValueError(
            f"export_dir {str(merged)!r} {'is' if merged == output_dir else 'holds'} output_dir {str(output_dir)!r}: the merged "
            f"model replaces that folder whole; give export_dir a folder of its own (default: output_dir/{MERGED_SUBDIR})"
        )


def _unreadable_weights(checkpoint: Path) -> str | None:
    """What of ``checkpoint``'s safetensors weights cannot be opened (a file cut off or deleted), from their headers
    only; None when all open."""
    index = checkpoint / INDEX_NAME
    try:
        files = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # ValueError: also UnicodeDecodeError
        return f"{index} is not a safetensors index ({type(error).__name__}: {error})"
    for name in sorted(files):
        try:
            with safe_open(checkpoint / name, framework="pt"):
                pass
        except (OSError, SafetensorError) as error:
            return f"{checkpoint / name} cannot be read ({error})"
    return None


def _check_no_stale_checkpoints(args: Mapping[str, Any], output_dir: Path, differs: str) -> None:
    """The model is about to be pruned (again): checkpoints of a run on an earlier pruned model must not be resumed."""
    from transformers.trainer_utils import get_last_checkpoint

    if args.get("resume_from_checkpoint"):
        raise ValueError(
            f"resume_from_checkpoint: {args['resume_from_checkpoint']} may have been trained on another pruned model than the "
            f"one {output_dir / PRUNED_SUBDIR} is about to hold ({differs}); remove it"
        )
    if output_dir.is_dir() and not args.get("overwrite_output_dir") and get_last_checkpoint(str(output_dir)):
        raise ValueError(
            f"output_dir: {output_dir} holds checkpoints of a run on a pruned model this run would prune again ({differs}), "
            "which LLaMA-Factory would resume on the model pruned again; set overwrite_output_dir: true, or use another "
            "output_dir"
        )


# LLaMA-Factory wraps the model of these stages in a value head, whose pruned model PruningCallback does not reach.
_VALUE_HEAD_STAGES = ("rm", "ppo")


def _delegate_training(args: dict[str, Any], keep_masks: bool, training: TrainingSections) -> None:
    """LLaMA-Factory's ``run_exp`` with the callbacks of ``training`` (``PruningCallback`` keeps the
    zeros when ``keep_masks``) and its distillation loss, here or under torchrun."""
    if keep_masks and args.get("stage") in _VALUE_HEAD_STAGES:
        raise ValueError(
            f"stage: {args['stage']} on the pruned model {args['model_name_or_path']}: LLaMA-Factory wraps it in a value "
            "head, inside which its zeros cannot be kept yet; train it with stage: sft, pt, dpo or kto"
        )
    _check_quantizable(args)
    import_llamafactory()
    if _wants_torchrun():
        _run_under_torchrun({**args, **training.to_mapping()}, keep_masks)
        return
    train_here(args, keep_masks, training)


def train_here(args: Mapping[str, Any], keep_masks: bool, training: TrainingSections) -> None:
    """LLaMA-Factory's ``run_exp`` in this process; when ``keep_masks``, adapters it merges while loading
    (``adapter_name_or_path`` with ``create_new_adapter``, or several) keep the pruned zeros too."""
    from llamafactory.train.tuner import run_exp

    with distilling_trainers(training.distill), loading_sparsity_metadata_as_plain(), (merges_keeping_zeros() if keep_masks else nullcontext()):
        run_exp(dict(args), callbacks=training.callbacks(keep_masks))


def _check_quantizable(args: Mapping[str, Any]) -> None:
    """QLoRA on a non-uniformly pruned model: its per-layer shapes ride on ``quantization_config``, which
    LLaMA-Factory takes for an already quantized model, so it would ignore ``quantization_bit`` (a warning)."""
    if not args.get("quantization_bit"):
        return
    try:
        quantization = json.loads((model_files(args) / "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
    except (OSError, ValueError):
        return
    if records_layer_shapes(quantization):
        raise ValueError(
            f"quantization_bit: {args['quantization_bit']} with {args['model_name_or_path']}, whose layers were pruned to "
            "different widths: LLaMA-Factory loads it unquantized (its per-layer shapes are stored as a quantization_config) "
            "and would train plain LoRA; remove quantization_bit, or prune with uniform widths (method_options ranking: layer)"
        )


def _wants_torchrun() -> bool:
    """LLaMA-Factory's own rule for launching ``train`` under torchrun."""
    from llamafactory.extras.misc import get_device_count, is_env_enabled, use_kt, use_ray

    return is_env_enabled("FORCE_TORCHRUN") or (get_device_count() > 1 and not use_ray() and not use_kt())


def _run_under_torchrun(args: dict[str, Any], keep_masks: bool) -> None:
    """Re-launch through torchrun with our worker as the entry point, so every rank keeps the masks.

    (``llamafactory-cli`` re-executes its own launcher file, which would drop the plugin.)
    """
    from llamafactory.extras.misc import find_available_port

    with tempfile.TemporaryDirectory(prefix="llamafactory-prune-") as scratch:
        config_path = Path(scratch) / "train.yaml"
        OmegaConf.save(OmegaConf.create(args), config_path)
        command = [
            sys.executable, "-m", "torch.distributed.run",  # torchrun, without relying on PATH
            "--nnodes", os.getenv("NNODES", "1"),
            "--node_rank", os.getenv("NODE_RANK", "0"),
            "--nproc_per_node", os.getenv("NPROC_PER_NODE", str(_device_count_or_one())),
            "--master_addr", os.getenv("MASTER_ADDR", "127.0.0.1"),
            "--master_port", os.getenv("MASTER_PORT", str(find_available_port())),
            "-m", "llamafactory_ext.worker", str(config_path), *(["--keep-masks"] if keep_masks else []),
        ]  # fmt: skip
        logger.info("launching: %s", " ".join(command))
        _run_stopping_its_workers(command)


# torchrun gives its workers 30 s after its own SIGTERM before it SIGKILLs them.
TORCHRUN_STOP_S = 60


def _run_stopping_its_workers(command: list[str]) -> None:
    """Run torchrun, and if we are stopped (Ctrl-C, SIGTERM as SystemExit), stop it with SIGTERM so that it stops
    its workers: ``subprocess.run`` SIGKILLs it at once, and the workers, in sessions of their own, train on."""
    with subprocess.Popen(command) as torchrun:
        try:
            returncode = torchrun.wait()
        except BaseException:
            torchrun.terminate()
            try:
                torchrun.wait(timeout=TORCHRUN_STOP_S)
            except subprocess.TimeoutExpired:
                torchrun.kill()
            raise
    if returncode:
        raise subprocess.CalledProcessError(returncode, command)


def _device_count_or_one() -> int:
    from llamafactory.extras.misc import get_device_count

    return max(1, get_device_count())


def merge_adapter(
    base_dir: Path, adapter_dir: Path, target: Path, dtype: torch.dtype | None = None, max_shard_size: str = DEFAULT_SHARD_SIZE
) -> Path:
    """Merge the LoRA adapter trained on ``base_dir`` into it (in float32), keeping the pruned zeros, and save it
    atomically in ``dtype`` (None: float32, the pruned model's) in shards of ``max_shard_size`` (the YAML's
    ``export_size``, as LLaMA-Factory's export)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    before = SparsityMasks.from_zeros(base)
    merged = merge_lora_preserving_sparsity(PeftModel.from_pretrained(base, adapter_dir))
    after = SparsityMasks.from_zeros(merged)
    logger.info("merged %s into %s: sparsity %.4f before, %.4f after", adapter_dir, target, before.sparsity(), after.sparsity())
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir)
    return save_pruned(merged.to(dtype) if dtype is not None else merged, target, tokenizer=tokenizer, max_shard_size=max_shard_size)


