"""``optimum-prune`` / ``optimum-cli prune``: prune a local checkpoint (or the embedded SmolLM2) and save it.

    optimum-prune --method wanda --sparsity 2:4 --output pruned/ --eval
    optimum-cli prune --model ckpt/ --method width --sparsity 0.2 --option criterion=flap --output narrow/
    optimum-prune --method layers --option num_layers=8 --output shallow/
    optimum-prune study examples/study/grid.yaml      # pruning × quantization sweep (optimum_prune.study)

Both commands share ``add_arguments`` and ``run``, so they take the same options.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from transformers.utils.logging import disable_progress_bar

from .adapters import get_adapter
from .allocation import ALLOCATIONS
from .atomic_files import InterruptedAfterReplacing, check_replaceable
from .api import check_multi_process, prune, warn_unused_calibration
from .calibration.sources import file_texts
from .config import PruningConfig
from .dependencies import MissingDependency
from .devices import check_activation_device, check_device
from .distributed import init_from_launcher, launched_processes, rank_zero_first, world
from .evaluation import TooFewTokens, check_whole_windows, evaluate_perplexity
from .methods import METHODS, per_layer_methods
from .models import (
    DTYPE_ALIASES, DTYPES, auto_class_name, default_model_path, load_default_model, load_model, load_processor, missing_tokenizer,
    PROCESSOR_FILES,
)
from .options import MoEOptions, describe_options, option_types
from .report import PruningReport
from .saving import save_pruned
from .sparsity import verify_sparsity
from .sparsity_metadata import require_compressed_tensors
from .structure.loading import records_layer_shapes

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimum-prune",
        description="Prune a causal LM and save it so that stock transformers reloads it. "
        "`optimum-prune study GRID.yaml` runs a pruning x quantization study instead (`optimum-prune study --help`).",
    )
    add_arguments(parser)
    return parser


def user_path(text: str) -> Path:
    """A path argument with ``~`` read as the home folder: the shell leaves ``--output=~/pruned`` as it is (a literal
    ``~`` folder in the working directory, which ``rm -rf ~`` would then be asked to clean up)."""
    return Path(text).expanduser()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of both commands; the epilog documents every method and allocation option."""
    defaults = PruningConfig()
    epilog = ["methods (--method NAME):"]
    epilog += [f"  {name}: {METHODS.get(name).summary}" for name in METHODS]
    epilog.append("method options (--option NAME=VALUE; VALUE as JSON: true, 0.5, null; text may go unquoted):")
    for name in METHODS:
        for option, default, help_text in describe_options(METHODS.get(name).options):
            epilog.append(f"  {name}.{option} (default {json.dumps(default)}): {help_text}")
    epilog.append("allocation options (--allocation-option NAME=VALUE):")
    for name in ALLOCATIONS:
        for option, default, help_text in describe_options(ALLOCATIONS.get(name).options):
            epilog.append(f"  {name}.{option} (default {json.dumps(default)}): {help_text}")
    epilog.append("mixture-of-experts options (--moe-option NAME=VALUE):")
    for option, default, help_text in describe_options(MoEOptions):
        epilog.append(f"  {option} (default {json.dumps(default)}): {help_text}")
    parser.epilog = "\n".join(epilog)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--config", type=user_path, metavar="PATH",
        help="a saved recipe (PruningConfig.save_pretrained: pruning_config.json, or the directory holding it) instead of "
        f"the recipe flags ({', '.join(RECIPE_FLAGS.values())})",
    )  # fmt: skip
    parser.add_argument("--method", choices=METHODS.names(), help=f"pruning method (default: {defaults.method})")
    parser.add_argument("--sparsity", help=f"what to remove, in [0, 1): the fraction of decoder-layer linear weights unless the method says otherwise (SliceGPT: of the hidden dimension; layers: of the decoder layers; experts and merge_experts: of each layer's experts; ZipLM: of the decoder's time), or an N:M pattern (unstructured methods), e.g. 0.5 or 2:4 (default: {defaults.sparsity})")
    parser.add_argument("-o", "--output", required=True, type=user_path, help="directory for the pruned checkpoint (replaced atomically)")
    parser.add_argument("-m", "--model", type=user_path, help="local checkpoint directory, or a .gguf file (dequantised on load) (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--calibration", type=user_path, help="text file for calibration, or a .jsonl / .json / .csv / .parquet file of records with a 'text' (or tokenised 'input_ids') column (default: bundled Wikipedia split)")
    parser.add_argument("--calibration-samples", type=int, help=f"calibration windows (default: {defaults.num_calibration_samples})")
    parser.add_argument("--seq-len", type=int, help=f"tokens per calibration window (default: {defaults.calibration_seq_len})")
    parser.add_argument("--seed", type=int, help=f"seed for sampling calibration windows and for what a method draws at random (default: {defaults.seed})")
    parser.add_argument("--allocation", choices=ALLOCATIONS.names(), help=f"how sparsity is spread over layers (per-layer unstructured methods: {per_layer_methods()}; default: {defaults.allocation})")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="method option")
    parser.add_argument("--allocation-option", action="append", default=[], metavar="NAME=VALUE", help="allocation option")
    parser.add_argument("--moe-option", action="append", default=[], metavar="NAME=VALUE", help="mixture-of-experts option")
    parser.add_argument("--ignore", action="append", default=[], metavar="GLOB", help="module names to keep dense")
    parser.add_argument(
        "--part", action="append", default=[], metavar="NAME[=SPARSITY]",
        help="a part of a multimodal model to prune: language, vision or projector, at its own sparsity if given (else "
        "--sparsity's); repeat it for each part (default: the language tower only)",
    )
    parser.add_argument("--device", help="where layers are processed (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), type=lambda name: DTYPE_ALIASES.get(name, name),
        help="dtype the model is loaded and pruned in; bf16, fp16 and fp32 work too (default: float32; with --offload disk, the checkpoint's)",
    )
    parser.add_argument(
        "--offload", choices=["disk"],
        help="keep the decoder layers on disk: each is read from --model's shards, pruned and written to --output in "
        "turn (memory: one layer, whatever the depth); rerunning an interrupted command resumes it",
    )
    parser.add_argument(
        "--activation-device",
        help="where calibration activations wait between layers, e.g. cpu while --device is cuda: the GPU then holds one "
        "layer and one batch of activations at a time; disk: files under $TMPDIR, read one batch at a time (methods that "
        "prune layer by layer from calibration activations; default: --device)",
    )
    parser.add_argument(
        "--compressed-tensors-metadata", action="store_true",
        help="write the compressed-tensors sparsity_config (which layers, 2:4 or unstructured) as the checkpoint's "
        "quantization_config, for serving stacks such as vLLM (needs the compressed-tensors package)",
    )
    parser.add_argument("--eval", action="store_true", help="report dense and pruned perplexity")
    parser.add_argument("--eval-file", type=user_path, help="evaluation text file, or a .jsonl / .json / .csv / .parquet file of records with a 'text' column, read as --calibration reads them (default: bundled Wikipedia evaluation split)")
    parser.add_argument(
        "--eval-tokens", type=eval_token_count, default=16384, metavar="N|all",
        help="tokens of evaluation text to score, or all: the whole text in whole --eval-seq-len windows (default: 16384)",
    )
    parser.add_argument("--eval-seq-len", type=int, default=512, help="tokens per perplexity window (default: 512)")


def eval_token_count(text: str) -> int | None:
    """``--eval-tokens``: a count, or ``all`` (None: ``evaluate_perplexity`` then scores the whole text)."""
    if text.lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or all, got {text!r}") from None


def _parse_options(pairs: Sequence[str], flag: str, options_cls: type | None) -> dict[str, Any]:
    """``NAME=VALUE`` pairs as options; a text option keeps its text as given (``criterion=false`` is the
    word, not a bool), so only options of other types (or unknown names, which ``PruningConfig`` names) read JSON."""
    text_options = {name for name, (kind, _) in option_types(options_cls).items() if kind is str} if options_cls else set()
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"{flag} expects NAME=VALUE, got {pair!r}")
        if name in text_options:
            options[name] = _text_or_json_string(value)
            continue
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = _number_flag_or_text(value)
    return options


def _parse_parts(values: Sequence[str]) -> dict[str, dict[str, str]]:
    """``--part NAME[=SPARSITY]`` flags as ``PruningConfig.parts`` (which checks the names and sparsities)."""
    parts: dict[str, dict[str, str]] = {}
    for value in values:
        name, sep, sparsity = value.partition("=")
        if name in parts:
            raise ValueError(f"--part {name} is given twice: give each part once")
        parts[name] = {"sparsity": sparsity} if sep else {}
    return parts


def _text_or_json_string(value: str) -> str | None:
    """A text option's value: as typed, or a JSON string (``"layer"``, as ``--help`` prints defaults) or ``null``."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value
    return parsed if parsed is None or isinstance(parsed, str) else value


def _number_flag_or_text(value: str) -> bool | float | str:
    """What JSON does not read but a command line means: numbers such as ``.01`` or ``1.``, and Python's
    ``True`` / ``False`` (any case); anything else stays text."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return float(value)
    except ValueError:
        return value


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# Each PruningConfig field a flag sets: the flags that make a recipe (keyed by argparse's dest), and the names the
# CLI's errors use for the fields.
_FIELD_FLAGS = {
    "method": "--method", "sparsity": "--sparsity", "method_options": "--option", "allocation": "--allocation",
    "allocation_options": "--allocation-option", "moe_options": "--moe-option", "ignore": "--ignore", "parts": "--part",
    "num_calibration_samples": "--calibration-samples", "calibration_seq_len": "--seq-len", "seed": "--seed",
}  # fmt: skip
RECIPE_FLAGS = {flag[2:].replace("-", "_"): flag for flag in _FIELD_FLAGS.values()}


def recipe(args: argparse.Namespace) -> PruningConfig:
    """The config ``--config`` names, or the one the recipe flags give (unset ones keep ``PruningConfig``'s defaults)."""
    given = [flag for dest, flag in RECIPE_FLAGS.items() if getattr(args, dest) not in (None, [])]
    if args.config is not None:
        if given:
            raise ValueError(
                f"--config {str(args.config)!r} is the whole recipe, which {', '.join(given)} would change: remove them, "
                "or edit the recipe"
            )
        if not args.config.exists():
            raise ValueError(f"--config {str(args.config)!r} does not exist (give pruning_config.json or the directory holding it)")
        return PruningConfig.from_pretrained(args.config)
    flags = {
        "method": args.method, "sparsity": args.sparsity, "allocation": args.allocation, "ignore": args.ignore,
        "method_options": _parse_options(args.option, "--option", _options_of(METHODS, args.method, "method")),
        "allocation_options": _parse_options(
            args.allocation_option, "--allocation-option", _options_of(ALLOCATIONS, args.allocation, "allocation")
        ),
        "moe_options": _parse_options(args.moe_option, "--moe-option", MoEOptions),
        "parts": _parse_parts(args.part),
        "num_calibration_samples": args.calibration_samples, "calibration_seq_len": args.seq_len, "seed": args.seed,
    }  # fmt: skip
    return PruningConfig(**{name: value for name, value in flags.items() if value is not None})


def _options_of(registry: Any, name: str | None, field_name: str) -> type | None:
    """The options class of the named (or default) entry; None for an unknown name, which ``PruningConfig`` refuses."""
    name = name if name is not None else PruningConfig.__dataclass_fields__[field_name].default
    return registry.get(name).options if name in registry else None


def run(args: argparse.Namespace) -> int:
    config = recipe(args)
    _check_args(args, config)
    if args.offload:
        return _run_offloaded(args, config)
    dtype = DTYPES[args.dtype or "float32"]
    args.widened_from = _narrower_stored_dtype(args.model) if args.model and args.dtype is None else None
    launched_device = init_from_launcher()  # torchrun / accelerate launch: calibration is split across processes
    if world()[0] != 0:  # every process prunes alike: the first one's warnings and bars say it once
        logging.getLogger("optimum_prune").setLevel(logging.ERROR)
        disable_progress_bar()
    if args.model is None:
        rank_zero_first(default_model_path)  # the first use converts the embedded model into the shared cache
    model, tokenizer = load_model(args.model, dtype) if args.model else load_default_model(dtype)
    processor = load_processor(args.model) if args.model else None  # a vision-language model's: images, and kept in the output
    if config.requires_calibration and config.image_parts() and get_adapter(model).upstream_parts:
        _check_image_calibration(args, processor, ", ".join(config.image_parts()))
    if tokenizer is None and (config.requires_calibration or args.eval):
        raise missing_tokenizer(args.model, "calibration" if config.requires_calibration else "--eval")
    device = args.device or launched_device or default_device()
    model.to(device)
    eval_text = file_texts(args.eval_file, "--eval-file") if args.eval_file else None

    def perplexity() -> float:
        try:
            return evaluate_perplexity(model, tokenizer, eval_text, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens)
        except TooFewTokens as error:
            if args.eval_tokens is None:
                raise ValueError(
                    f"the evaluation text has {error.tokens:,} tokens, fewer than one window of --eval-seq-len "
                    f"{args.eval_seq_len}: give more text, or lower --eval-seq-len"
                ) from None
            raise ValueError(
                f"the evaluation text has {error.tokens:,} tokens, fewer than --eval-tokens {args.eval_tokens}: give more "
                "text, lower --eval-tokens, or score all of it with --eval-tokens all"
            ) from None

    dense = perplexity() if args.eval and world()[0] == 0 else None
    before = verify_sparsity(model)["overall_sparsity"]
    source = "before" if getattr(model.config, "pruning_config", None) else "dense"  # a pruned checkpoint pruned again
    report = prune(
        model, config, calibration=args.calibration, tokenizer=tokenizer, device=device, activation_device=args.activation_device,
        processor=processor,
    )
    if world()[0] != 0:
        return 0  # every process holds the same pruned model; the first one evaluates, saves and reports
    pruned = perplexity() if args.eval else None
    started = time.perf_counter()
    save_pruned(
        model, args.output, tokenizer=processor or tokenizer, config=config, report=report,
        compressed_tensors_metadata=args.compressed_tensors_metadata,
    )
    args.saved = True  # what an interruption from here on leaves: the output, whole
    saved_in = time.perf_counter() - started
    after = verify_sparsity(model, config.target if isinstance(config.sparsity, str) else None)
    if after["pattern"]:  # conformity of what the config pruned (routers, ignored linears and other parts stay dense)
        pruned_names = {linear.name for linear in report.linears}
        after["conforming"] = all(entry["conforming"] for name, entry in after["layers"].items() if name in pruned_names)
    _print_summary(args, model, report, source, before, after, (dense, pruned), saved_in)
    return 0


def _check_image_calibration(args: argparse.Namespace, processor: Any, parts: str) -> None:
    """A vision tower or projector calibrates on the bundled image-caption pairs, through the checkpoint's processor."""
    if args.calibration is not None:
        raise ValueError(
            f"--part {parts} calibrates on images, which the --calibration text has none of: leave --calibration out to "
            "calibrate on the bundled image-caption pairs, or prune that part with a method that needs no calibration "
            "(--method magnitude)"
        )
    if not hasattr(processor, "tokenizer"):  # none, or an image processor alone
        raise ValueError(
            f"--part {parts} calibrates on images, which need the model's processor: {str(args.model)!r} has none "
            f"({', '.join(PROCESSOR_FILES)} beside tokenizer files); save it into the checkpoint "
            "(processor.save_pretrained(...)), or prune that part with a method that needs no calibration (--method magnitude)"
        )


def _check_args(args: argparse.Namespace, config: PruningConfig) -> None:
    """Every flag checked against the others and the machine before any model loads."""
    if args.calibration is not None and not args.calibration.is_file():
        raise ValueError(f"--calibration {str(args.calibration)!r} is not a file")
    warn_unused_calibration(config, args.calibration, "--calibration")
    if not config.requires_calibration:
        args.calibration = None  # said here, before the model loads, not again by prune
    if args.eval_file is not None and not args.eval:
        raise ValueError("--eval-file is the text --eval scores: add --eval, or remove --eval-file")
    if args.eval_file is not None and not args.eval_file.is_file():
        raise ValueError(f"--eval-file {str(args.eval_file)!r} is not a file")
    if args.eval:
        check_whole_windows(args.eval_tokens, args.eval_seq_len, "--eval-tokens", "--eval-seq-len")
    if args.device is not None:
        check_device(args.device, "--device")
    check_activation_device(args.activation_device, config, "--activation-device")
    if launched_processes() > 1 and not args.offload:  # not after every process has loaded the whole model
        check_multi_process(config)
    if args.compressed_tensors_metadata:
        if METHODS.get(config.method).structured:
            raise ValueError(f"--compressed-tensors-metadata describes sparse weights; structured method {config.method!r} leaves dense ones")
        require_compressed_tensors()
    check_replaceable(args.output, args.model, "--output")  # before loading and pruning, not at the final rename


def _print_summary(
    args: argparse.Namespace, model: Any, report: PruningReport, source: str, before: float, after: dict[str, Any],
    perplexities: tuple[float | None, float | None], saved_in: float,
) -> None:
    """The table the CLI ends with: sizes or sparsity before and after, perplexities, time, and how to reload."""
    dense, pruned = perplexities
    rows = [("", source, "pruned")]
    if report.shapes:
        rows.append(("decoder layers' parameters", f"{report.decoder_parameters_before:,}", f"{report.decoder_parameters_after:,}"))
        rows.append(("parameters", f"{report.parameters_before:,}", f"{report.parameters_after:,}"))
        rows.append((report.macs_label, f"{report.macs_per_token_before:,}", f"{report.macs_per_token_after:,}"))
    else:
        # every linear's zeros (routers, parts left dense), then the pruned ones' (all the offloaded summary gives)
        rows.append(("sparsity of all linears (excl. lm_head)", f"{before:.2%}", f"{after['overall_sparsity']:.2%}"))
        rows.append(("sparsity of the pruned linears", "", f"{report.overall_sparsity:.2%}"))
    if args.eval:
        scored = "the whole text" if args.eval_tokens is None else f"{args.eval_tokens:,} tokens"
        rows.append((f"perplexity ({scored})", f"{dense:.2f}", f"{pruned:.2f}"))
    rows.append(("pruning time", "", f"{report.seconds:.1f} s"))
    if after["pattern"]:
        rows.append((f"{after['pattern']} conforming", "", str(after["conforming"])))
    width = max(len(r[0]) for r in rows)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"\n{report.request} -> {args.output}  ({dtype}, saved in {saved_in:.1f} s)")
    if args.widened_from:
        print(f"the checkpoint was {args.widened_from}, loaded and saved as float32 (the --dtype default, for the pruning's "
              f"statistics): --dtype {args.widened_from} keeps it, and the output half the size")
    for label, left, right in rows:
        print(f"{label:<{width}}  {left:>12}  {right:>12}")
    for line in [*report.removed_lines(), *report.notes]:  # a note says what the table cannot (tuning skipped, a speed-up)
        print(line)
    if records_layer_shapes(getattr(model.config, "quantization_config", None)):
        print(f"reload: import optimum_prune, then {auto_class_name(model)}.from_pretrained (per-layer shapes in quantization_config)")
    elif args.compressed_tensors_metadata:
        print(f"reload: {auto_class_name(model)}.from_pretrained(..., dtype=torch.float32), compressed-tensors installed "
              "(its loader defaults to float16)")
    else:
        print(f"reload: {auto_class_name(model)}.from_pretrained (stock transformers)")


def _narrower_stored_dtype(model: Path) -> str | None:
    """The dtype a checkpoint folder's config.json names when it is half precision (None otherwise, or unreadable:
    loading reports that)."""
    try:
        stored = json.loads((model / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = (stored.get("dtype") or stored.get("torch_dtype")) if isinstance(stored, dict) else None
    return name if name in ("bfloat16", "float16") else None


def _run_offloaded(args: argparse.Namespace, config: PruningConfig) -> int:
    """``--offload disk``: ``prune_checkpoint`` from --model's shards into --output."""
    from .streaming import prune_checkpoint

    if args.model is None:
        raise ValueError("--offload disk reads the layers from a checkpoint directory: give --model")
    if args.eval or args.compressed_tensors_metadata:
        raise ValueError("--offload disk never holds the whole model: evaluate or annotate the saved checkpoint separately")
    if launched_processes() > 1:
        raise ValueError("--offload disk runs in one process (every process would write the same layers): launch it without torchrun")
    report = prune_checkpoint(  # which tokenizes text calibration with the checkpoint's tokenizer
        args.model, args.output, config, calibration=args.calibration, device=args.device or default_device(),
        dtype=DTYPES[args.dtype] if args.dtype else None, activation_device=args.activation_device,
    )  # fmt: skip
    args.saved = True
    print(f"\n{report.request} -> {args.output}")
    print(f"sparsity of the pruned linears: {report.overall_sparsity:.2%}; pruning time {report.seconds:.1f} s; "
          f"peak {report.peak_memory_kind} {report.peak_memory_bytes / 2**20:.0f} MiB")  # fmt: skip
    for note in report.notes:
        print(note)
    return 0


def run_or_exit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``run``, exiting as a command does (``exiting_as_a_command``)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    worded = str if args.config is not None else _in_flags  # --config's errors name its fields
    with exiting_as_a_command(parser, lambda interrupt: _left_on_disk(args, interrupt), worded):
        with nullcontext() if args.config is not None else messages_worded(_in_flags):
            return run(args)


def _left_on_disk(args: argparse.Namespace, interrupt: KeyboardInterrupt) -> str:
    if getattr(args, "saved", False) or isinstance(interrupt, InterruptedAfterReplacing):
        return "after the pruned model was saved: --output holds it, whole"
    if args.offload:
        return f"the layers finished so far (if any) are kept in .{args.output.name}.partial beside --output: run the same command again to resume"
    return "nothing was saved; --output is as it was"


@contextmanager
def exiting_as_a_command(
    parser: argparse.ArgumentParser, left_on_disk: Callable[[KeyboardInterrupt], str], worded: Callable[[str], str] = str
) -> Iterator[None]:
    """While a command runs: SIGTERM is an exit (``exiting_on_sigterm``), a bad request one error line (``worded``)
    and exit status 2, as argparse gives, and Ctrl-C one line saying what is on disk (``left_on_disk``) and exit
    status 130, not a traceback of wherever it landed."""
    try:
        with exiting_on_sigterm():
            yield
    except (ValueError, TypeError, MissingDependency) as error:
        parser.exit(2, f"{parser.prog}: error: {worded(str(error))}\n")
    except KeyboardInterrupt as interrupt:
        parser.exit(130, f"{parser.prog}: interrupted: {left_on_disk(interrupt)}\n")


@contextmanager
def exiting_on_sigterm() -> Iterator[None]:
    """SIGTERM (docker stop, Slurm, Kubernetes) as an exit while a command runs, so that its ``with`` and ``finally``
    blocks run: Python's default ends the process without them, leaving a temporary folder of calibration
    activations (gigabytes) and staged outputs behind. Ctrl-C already unwinds so."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield  # signals go to the main thread; a handler someone else installed stays theirs
        return
    signal.signal(signal.SIGTERM, lambda number, _frame: sys.exit(128 + number))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# A PruningConfig field named in an error, said as its flag (_FIELD_FLAGS).
_CONFIG_FIELD = re.compile(rf"PruningConfig\.({'|'.join(_FIELD_FLAGS)})\b(\.(?=\w))?")


@contextmanager
def messages_worded(worded: Callable[[str], str]) -> Iterator[None]:
    """While a command runs, what it logs is ``worded`` as its errors are (config fields named as its flags, or as
    its YAML's keys)."""
    handlers = list(logging.getLogger().handlers)
    wording = _Worded(worded)
    for handler in handlers:
        handler.addFilter(wording)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(wording)


class _Worded(logging.Filter):
    def __init__(self, worded: Callable[[str], str]) -> None:
        super().__init__()
        self.worded = worded

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.worded(record.getMessage()), None
        return True


# A part's sparsity named in an error, said as the flag that sets it.
_PART_SPARSITY = re.compile(r"PruningConfig\.parts\['(\w+)'\]\.sparsity")


def _in_flags(message: str) -> str:
    """``message`` naming the flags where it names config fields (``PruningConfig.method_options.merge`` is
    ``--option merge``)."""
    message = _PART_SPARSITY.sub(r"the sparsity of --part \1", message)
    return _CONFIG_FIELD.sub(lambda match: _FIELD_FLAGS[match[1]] + (" " if match[2] else ""), message)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["study"]:
        from .study.cli import main as study

        return study(argv[1:])
    parser = build_parser()
    return run_or_exit(parser, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
