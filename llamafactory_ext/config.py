"""The ``pruning:`` section of a LLaMA-Factory YAML.

Its keys are exactly ``PruningConfig``'s fields plus ``calibration_dataset`` (a dataset name
from LLaMA-Factory's ``dataset_info.json``; default: the YAML's own ``dataset``), ``offload``
(``disk``: prune from the checkpoint's shards one layer at a time, ``optimum_prune.prune_checkpoint``)
and ``activation_device`` (e.g. ``cpu``: calibration activations wait there between layers; ``disk``: in
temporary files). Calibration
text goes through LLaMA-Factory's own tokenisation: conversational datasets (with responses)
with the YAML's chat template as in SFT, plain-text ones as in pre-training. An unknown key here is
an error that lists the valid ones: a misspelt ``sparsity`` must never silently prune at the default.

    pruning:
      method: wanda
      sparsity: "2:4"
      calibration_dataset: wiki_pt
      num_calibration_samples: 64
      calibration_seq_len: 512
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from optimum_prune import PruningConfig
from optimum_prune.api import check_offloadable_recipe
from optimum_prune.config import is_provenance, is_recorded
from optimum_prune.devices import check_activation_device
from optimum_prune.calibration.sources import read_text_file
from optimum_prune.yaml_files import load_yaml

from .compat import import_llamafactory
from .sections import unknown_key

SECTION = "pruning"
EXTRA_KEYS = ("calibration_dataset", "offload", "activation_device")
OFFLOADS = ("disk",)
# LLaMA-Factory's default dataset_dir, used when the YAML names none.
DEFAULT_DATASET_DIR = "data"


@dataclass(frozen=True)
class PruningSection:
    """A YAML's ``pruning:`` section, checked: the ``PruningConfig`` it holds and the keys it adds (the calibration
    dataset, ``offload``, ``activation_device``)."""

    config: PruningConfig
    calibration_dataset: str | None
    # How LLaMA-Factory tokenises the calibration data: "sft" (chat template, prompts and
    # responses) when every calibration dataset has responses, else "pt" (plain text).
    calibration_stage: str = "pt"
    offload: str | None = None  # "disk": layers stay on disk (prune_checkpoint)
    activation_device: str | None = None  # where calibration activations wait between layers (prune's)

    @classmethod
    def from_mapping(cls, section: Any, lf_args: Mapping[str, Any]) -> "PruningSection":
        """Validate ``section`` against the rest of the YAML (``lf_args``) before anything runs."""
        if not isinstance(section, Mapping):
            raise ValueError(f"{SECTION}: must be a mapping of PruningConfig fields, got {type(section).__name__}")
        fields = [f.name for f in dataclasses.fields(PruningConfig)]
        # what a saved pruning_config.json adds, pasted in as it is: its format and version stamps
        stored = ["format_version", *(key for key in section if is_provenance(key))]
        key = unknown_key(section, [*fields, *stored, *EXTRA_KEYS])
        if key is not None:
            raise ValueError(f"{SECTION}.{key} is not a valid key; valid keys: {', '.join(sorted([*fields, *EXTRA_KEYS]))}")
        recipe = {key: value for key, value in section.items() if key in fields or key in stored}
        try:  # a saved pruning_config.json pasted in reads as from_pretrained reads it
            config = PruningConfig.from_stored(recipe, f"the {SECTION}: section") if is_recorded(recipe) else PruningConfig.from_dict(recipe)
        except (TypeError, ValueError) as error:
            raise ValueError(in_yaml_terms(str(error))) from None
        offload = section.get("offload")
        if offload is not None and offload not in OFFLOADS:
            raise ValueError(f"{SECTION}.offload must be one of {', '.join(OFFLOADS)} (or absent), got {offload!r}")
        if offload is not None:
            try:
                check_offloadable_recipe(config)
            except ValueError as error:
                raise ValueError(in_yaml_terms(f"{SECTION}.offload: {offload}: {error}")) from None
        activation_device = section.get("activation_device")
        check_activation_device(activation_device, config, f"{SECTION}.activation_device")
        named = section.get("calibration_dataset")
        # refused, not warned of as the CLI's --calibration is: a key the section would ignore is an error, as options are
        if named is not None and not config.requires_calibration:
            raise ValueError(f"{SECTION}.calibration_dataset: method {config.method!r} needs no calibration data; remove the key")
        if named is not None and not _dataset_names(named):
            raise ValueError(f"{SECTION}.calibration_dataset is empty: name a dataset from dataset_info.json, or remove the key")
        dataset = _dataset_names(named if named is not None else lf_args.get("dataset"))
        if config.requires_calibration and config.image_parts():
            raise ValueError(
                f"{SECTION}.parts.{config.image_parts()[0]}: method {config.method!r} calibrates a vision tower or projector on images, "
                "and this stage calibrates on the token windows of LLaMA-Factory datasets, which hold none; prune that "
                "part with a method that needs no calibration (magnitude), or with the Python API on image-text pairs"
            )
        if config.requires_calibration:
            if not dataset:
                raise ValueError(
                    f"{SECTION}.calibration_dataset is required: method {config.method!r} needs calibration data and the "
                    "YAML names no `dataset`; set it to a dataset from dataset_info.json"
                )
            stage = _calibration_stage(dataset, lf_args.get("dataset_dir", DEFAULT_DATASET_DIR))
            return cls(config, dataset, stage, offload, activation_device)
        return cls(config, None, offload=offload, activation_device=activation_device)


def in_yaml_terms(message: str) -> str:
    """An error of ``PruningConfig`` (or of pruning with it) as this YAML spells it: ``pruning.<key>``."""
    message = yaml_keys(message)
    return message if message.startswith(f"{SECTION}.") else f"{SECTION}: {message}"


_CONFIG_PART = re.compile(rf"{PruningConfig.__name__}\.parts\['(\w+)'\]")


def yaml_keys(message: str) -> str:
    """``message`` naming this YAML's keys where it names ``PruningConfig`` fields (``PruningConfig.parts['vision']``
    is ``pruning.parts.vision``): errors and what the run logs."""
    message = _CONFIG_PART.sub(rf"{SECTION}.parts.\1", message)
    return message.replace(f"{PruningConfig.__name__}.", f"{SECTION}.")


def _dataset_names(value: Any) -> str | None:
    """LLaMA-Factory's dataset names: a comma-separated string or a YAML list; calibrate on all of them."""
    if value is None:
        return None
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _calibration_stage(datasets: str, dataset_dir: str) -> str:
    """"sft" for conversational datasets (LLaMA-Factory's alpaca default has a response column; sharegpt
    and openai are dialogues), "pt" for plain text. Read by LLaMA-Factory's own parser, so hub datasets
    (``dataset_dir: ONLINE`` or ``REMOTE:repo``) are read as it reads them."""
    import_llamafactory()
    from llamafactory.data.parser import get_dataset_list

    if dataset_dir != "ONLINE" and not dataset_dir.startswith("REMOTE:"):
        _check_registered(datasets, dataset_dir)  # its own error names neither the file nor the registered names
    names = [name.strip() for name in datasets.split(",")]
    attributes = get_dataset_list(names, dataset_dir)
    conversational = {name: a.formatting != "alpaca" or bool(a.response) for name, a in zip(names, attributes)}
    if len(set(conversational.values())) > 1:
        raise ValueError(
            f"{SECTION}.calibration_dataset mixes conversational ({', '.join(n for n, c in conversational.items() if c)}) and "
            f"plain-text ({', '.join(n for n, c in conversational.items() if not c)}) datasets, whose records LLaMA-Factory "
            "cannot concatenate; calibrate on datasets of one kind"
        )
    return "sft" if all(conversational.values()) else "pt"


def _check_registered(datasets: str, dataset_dir: str) -> None:
    """An error naming the first of the comma-separated ``datasets`` missing from dataset_info.json."""
    info_path = Path(dataset_dir) / "dataset_info.json"
    if not info_path.is_file():
        raise ValueError(
            f"{SECTION}.calibration_dataset {datasets!r}: {info_path} does not exist; set `dataset_dir` to the folder "
            "holding your dataset_info.json"
        )
    try:
        registered = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{info_path} is not valid JSON ({error})") from None
    for name in (part.strip() for part in datasets.split(",")):
        if name not in registered:
            raise ValueError(
                f"{SECTION}.calibration_dataset {name!r} is not in {info_path}; registered: {', '.join(sorted(registered))}"
            )


def read_yaml(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The YAML as a dict with ``key=value`` (dotted keys allowed) overrides merged, as ``llamafactory-cli`` reads it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    args = load_yaml(read_text_file(path, "config file"), str(path))
    if not isinstance(args, dict):
        raise ValueError(f"{path} must be a mapping of LLaMA-Factory arguments, got {type(args).__name__}")
    merged = OmegaConf.create(args)
    for override in overrides:
        key, separator, value = override.partition("=")
        if not separator or not key:
            raise ValueError(f"override {override!r} is not of the form key=value")
        try:
            OmegaConf.update(merged, key, load_yaml(value, f"override {override!r}"), force_add=True)
        except (OmegaConfBaseException, ValueError) as error:  # an index past a list's end, a key into a list
            raise ValueError(f"override {override!r} cannot be applied: {error}".splitlines()[0]) from None
    return OmegaConf.to_container(merged)


def model_loading_kwargs(args: Mapping[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` arguments for a model the YAML (``args``) loads besides LLaMA-Factory's own:
    what its loader passes (``_get_init_kwargs``, with its defaults), so a Hub revision, token, cache
    or remote code reaches every model the YAML's model does (its reference models inherit them too)."""
    return {
        "revision": args.get("model_revision", "main"),
        "token": args.get("hf_hub_token"),
        "cache_dir": args.get("cache_dir"),
        "trust_remote_code": args.get("trust_remote_code", False),
    }


def split_pruning(args: Mapping[str, Any]) -> tuple[dict[str, Any], PruningSection | None]:
    """(LLaMA-Factory's own arguments, the validated ``pruning:`` section or ``None``)."""
    lf_args = {key: value for key, value in args.items() if key != SECTION}
    if SECTION not in args:
        return lf_args, None
    return lf_args, PruningSection.from_mapping(args[SECTION], lf_args)
