"""``PruningConfig``: what to prune, how, and with which calibration settings.

A plain dataclass, validated on construction, that round-trips exactly through JSON so it can
be stored next to a checkpoint (``pruning_config.json`` and a ``pruning_config`` entry of
``config.json``) and rebuilt from a CLI, a YAML section or a dict. ``save_pretrained`` /
``from_pretrained`` go through Optimum's configuration machinery, like other Optimum configs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Literal, Mapping, overload

from .allocation import ALLOCATIONS, AllocationSpec
from .calibration.sources import read_text_file
from .ignoring import as_patterns
from .methods import METHODS, MethodSpec
from .options import MoEOptions, as_option_type, build_options, fraction_only_options, ignored_options, options_to_dict
from .sparsity import NMPattern, SparsityTarget, normalise_sparsity

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "pruning_config.json"
# Written beside the fields by Optimum's configuration files (this package's version with them); informative only.
# Any other ``*_version`` key a later release stamps is read as provenance too, so this release reads its files.
PROVENANCE_KEYS = ("optimum_version", "transformers_version", "optimum_prune_version")


@dataclass
class PruningConfig:
    """What to prune and how: a method and its ``sparsity``, how it is spread over layers (``allocation``), what is
    left dense (``ignore``), per-part targets of a multimodal model (``parts``) and the calibration sample. Checked
    when built; an Optimum configuration (``save_pretrained`` / ``from_pretrained``). Each field's help says more."""

    method: str = field(
        default="wanda",
        metadata={"help": "Registered pruning method, e.g. unstructured 'wanda' or 'sparsegpt', structured 'width' or 'layers'; "
        "`optimum-prune --help` (or optimum_prune.METHODS) lists them all with their options."},
    )
    sparsity: float | str | NMPattern = field(
        default=0.5,
        metadata={
            "help": "Fraction of decoder-layer linear weights to remove, in [0, 1), or for unstructured methods an "
            "'N:M' pattern such as '2:4' (N kept of every M). Structured methods remove whole units; what the fraction counts is "
            "theirs to say (decoder-layer linear parameters for most; slicegpt: the hidden dimension, layers: decoder layers, experts and merge_experts: experts per layer, "
            "ziplm by default: decoder time)."
        },
    )
    method_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Options of the chosen method (see each method's options class)."}
    )
    allocation: str = field(
        default="uniform", metadata={"help": "How the target is spread over layers: 'uniform', 'owl' or 'sensitivity'."}
    )
    allocation_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "Options of the allocation."})
    ignore: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Glob patterns of module names left dense, e.g. ['*.self_attn.o_proj', 'model.layers.0.*']. "
            "Only linears inside decoder layers (and the vision tower's and projector's, where parts names them) are "
            "pruned: embeddings and lm_head always stay dense."
        },
    )
    moe_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Mixture-of-experts handling: routing_weighted, unrouted_experts, prune_router, expert_sparsity, "
        "expert_deviation (see MoEOptions)."},
    )
    parts: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "Multimodal models: the stacks to prune, each with its own policy, e.g. {'language': {}, 'vision': "
            "{'sparsity': 0.3}}. Parts: 'language' (decoder layers), 'vision' (vision encoder layers), 'projector'. A "
            "policy may set 'sparsity' (default: the config's). Empty means the language tower only; parts not named stay dense."
        },
    )
    num_calibration_samples: int = field(default=128, metadata={"help": "Calibration windows (paper default 128)."})
    calibration_seq_len: int = field(default=2048, metadata={"help": "Tokens per calibration window."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling calibration windows and for what a method draws at random (width's random criterion, ZipLM's search, K-prune's sampled gradients, the sensitivity allocation's Hutchinson probes)."})

    def __post_init__(self) -> None:
        for name, registry in (("method", METHODS), ("allocation", ALLOCATIONS)):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"PruningConfig.{name} must be one name (one of {', '.join(registry)}), got {getattr(self, name)!r}")
        spec = METHODS.get(self.method)
        self.sparsity = normalise_sparsity(self.sparsity, "PruningConfig.sparsity")
        self.method_options = _complete_options(
            spec.options, self.method_options, "PruningConfig.method_options", lambda: _other_methods_options(self.method, self.method_options)
        )
        self.moe_options = _complete_options(MoEOptions, self.moe_options, "PruningConfig.moe_options")
        allocation = ALLOCATIONS.get(self.allocation)
        self.allocation_options = _complete_options(
            allocation.options, self.allocation_options, "PruningConfig.allocation_options"
        )
        self.parts = _checked_parts(self.parts, self.sparsity)
        self._check_combinations(spec, allocation)
        self.ignore = list(as_patterns(self.ignore, "PruningConfig.ignore", ordered=True))  # None: a blank `ignore:` in a YAML
        for name in ("num_calibration_samples", "calibration_seq_len", "seed"):  # a wrong type: TypeError, as for options
            setattr(self, name, as_option_type(getattr(self, name), int, False, f"PruningConfig.{name}"))
        for name in ("num_calibration_samples", "calibration_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PruningConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not -(2**63) <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
            raise ValueError(f"PruningConfig.seed must be in [-2**63, 2**64), got {self.seed}")

    def _check_combinations(self, spec: MethodSpec, allocation: AllocationSpec) -> None:
        """The fields that only some kinds of method read, or that exclude each other, checked together: a field
        a method would ignore is refused rather than dropped without a word."""
        if spec.structured is not None and set(self.parts) - {"language"}:
            raise ValueError(
                f"PruningConfig.parts {sorted(self.parts)}: structured method {self.method!r} prunes the language tower "
                "only; name just 'language' (or leave parts empty) or use an unstructured method for the other parts"
            )
        whole_model = spec.structured is not None or spec.model_pruner is not None
        if whole_model and self.parts.get("language", {}).get("sparsity", self.sparsity) != self.sparsity:
            raise ValueError(
                f"PruningConfig.parts['language'].sparsity {self.parts['language']['sparsity']!r} differs from "
                f"PruningConfig.sparsity {self.sparsity!r}: method {self.method!r} prunes the language tower only, so give "
                "its sparsity once, as PruningConfig.sparsity"
            )
        patterns = [str(t) for t in self.part_targets().values() if isinstance(t, NMPattern)]
        if spec.structured is not None:
            if patterns:
                raise ValueError(
                    f"PruningConfig.sparsity {patterns[0]!r}: N:M patterns apply to unstructured methods; the structured "
                    f"method {self.method!r} takes the fraction of decoder-layer parameters to remove, e.g. 0.2"
                )
            if allocation.allocation.varies_per_layer:
                raise ValueError(
                    f"PruningConfig.allocation {self.allocation!r} applies to unstructured methods; structured method "
                    f"{self.method!r} chooses what each layer loses itself (see its options): use allocation='uniform'"
                )
        if spec.structured is not None and self.moe_options != options_to_dict(MoEOptions()):
            raise ValueError(
                f"PruningConfig.moe_options tell unstructured methods how to prune experts; structured method "
                f"{self.method!r} does not read them (see its method_options): remove them"
            )
        moe = self.build_moe_options()
        if spec.model_pruner is not None and (moe.expert_sparsity != "uniform" or not moe.routing_weighted):
            raise ValueError(
                f"PruningConfig.moe_options: method {self.method!r} sets one threshold over curvature costs whose "
                "gradients already carry each token's routing weight, so expert_sparsity='load' and routing_weighted=False "
                "do not apply: remove them"
            )
        if spec.model_pruner is not None and (allocation.allocation.varies_per_layer or set(self.parts) - {"language"}):
            raise ValueError(
                f"PruningConfig.allocation / parts: method {self.method!r} chooses per-layer sparsity itself from one "
                "threshold across the language model's layers; use allocation='uniform' and no other parts"
            )
        if spec.pruner is not None and not spec.needs_calibration(self.build_method_options()):
            routed = {"expert_sparsity='load'": moe.expert_sparsity == "load", "routing_weighted=False": not moe.routing_weighted,
                      f"unrouted_experts={moe.unrouted_experts!r}": moe.unrouted_experts != MoEOptions().unrouted_experts}  # fmt: skip
            given = [setting for setting, is_set in routed.items() if is_set]
            if given:
                raise ValueError(
                    f"PruningConfig.moe_options.{given[0]} reads the routing of calibration tokens; method {self.method!r} "
                    "takes none (use wanda or sparsegpt)"
                )
        if moe.expert_sparsity == "load" and spec.pruner is not None:
            where = "PruningConfig.moe_options.expert_sparsity='load'"
            if patterns:
                raise ValueError(
                    f"{where} varies sparsity per expert and cannot be combined with the N:M pattern {patterns[0]!r}; use "
                    "a float sparsity, or expert_sparsity='uniform'"
                )
        if allocation.allocation.varies_per_layer and patterns:
            raise ValueError(
                f"PruningConfig.allocation {self.allocation!r} varies sparsity per layer and cannot be combined "
                f"with the N:M pattern {patterns[0]!r}; use a float sparsity or allocation='uniform'"
            )
        unread = fraction_only_options(spec.options, self.method_options) if len(patterns) == len(self.part_targets()) else []
        if unread:
            raise ValueError(
                f"PruningConfig.method_options.{unread[0]} applies to a fractional sparsity; the N:M pattern {patterns[0]!r} "
                "ranks within its own groups of M inputs, so it would be ignored: remove it"
            )
        if spec.pruner is not None:
            options = self.build_method_options()
            for target in {t for t in self.part_targets().values() if isinstance(t, NMPattern)}:
                spec.pruner.check_options_target(options, target)

    @property
    def target(self) -> SparsityTarget:
        """The sparsity as a float or a parsed ``NMPattern``."""
        return _target(self.sparsity)

    def part_targets(self) -> dict[str, SparsityTarget]:
        """Sparsity target of each part to prune, in the order the policies were given."""
        parts = self.parts or {"language": {}}
        return {name: _target(policy.get("sparsity", self.sparsity)) for name, policy in parts.items()}

    def image_parts(self) -> list[str]:
        """The parts named that run on images only (a vision tower, a projector): calibrated on image-text pairs."""
        return [part for part in self.part_targets() if part != "language"]

    def shared_pattern(self) -> NMPattern | None:
        """The N:M pattern every part prunes to, when they share one: what the pruned weights can be checked against."""
        targets = set(self.part_targets().values())
        target = targets.pop() if len(targets) == 1 else None
        return target if isinstance(target, NMPattern) else None

    @property
    def requires_calibration(self) -> bool:
        needs = METHODS.get(self.method).needs_calibration(self.build_method_options())
        return needs or ALLOCATIONS.get(self.allocation).allocation.requires_calibration

    def build_method_options(self) -> Any:
        return build_options(METHODS.get(self.method).options, self.method_options, "PruningConfig.method_options")

    def build_moe_options(self) -> MoEOptions:
        return build_options(MoEOptions, self.moe_options, "PruningConfig.moe_options")

    def build_allocation_options(self) -> Any:
        return build_options(
            ALLOCATIONS.get(self.allocation).options, self.allocation_options, "PruningConfig.allocation_options"
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as stored (JSON, ``save_pretrained``), checked again: a field set after construction skipped
        ``__post_init__``, and would be written as nothing reads back (``sparsity = 1.5``, an ``NMPattern``)."""
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(dataclasses.replace(self))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruningConfig":
        if not isinstance(data, Mapping):
            raise TypeError(f"a pruning config is a mapping of PruningConfig fields, got {type(data).__name__}: {data!r:.80}")
        data = {key: value for key, value in data.items() if not is_provenance(key)}
        version = data.pop("format_version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"format_version must be an integer, got {version!r}")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"format_version {version} is not supported by this optimum-prune (reads {FORMAT_VERSION}); upgrade optimum-prune"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)  # a YAML's unquoted `on:` is a key True
        if unknown:
            raise ValueError(f"PruningConfig has no field(s) {', '.join(map(str, unknown))}; valid fields: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_stored(cls, data: Mapping[str, Any], where: str = "a recorded pruning_config") -> "PruningConfig":
        """``from_dict`` of a config a run recorded (a model config's ``pruning_config``, a saved ``pruning_config.json``;
        the warning names ``where``). Settings its method does not read, which this version refuses and an earlier one
        accepted (and ignored), are read as unset, with a warning: the recipe reads, meaning what it did."""
        return cls.from_dict(_readable_record(data, where) if isinstance(data, Mapping) else data)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write ``save_directory/pruning_config.json`` with Optimum's ``BaseConfig.save_pretrained``
        (``push_to_hub`` and its keyword arguments work as there)."""
        from .integrations.optimum import PruningConfigFile

        if Path(save_directory).is_file():  # Optimum's own check is a bare assert
            raise ValueError(f"PruningConfig.save_pretrained: {os.fspath(save_directory)!r} is a file; give a directory")
        PruningConfigFile(**self.to_dict()).save_pretrained(os.fspath(save_directory), push_to_hub=push_to_hub, **kwargs)

    @overload
    @classmethod
    def from_pretrained(
        cls, path_or_repo: str | os.PathLike, return_unused_kwargs: Literal[False] = False, **kwargs: Any
    ) -> "PruningConfig": ...

    @overload
    @classmethod
    def from_pretrained(
        cls, path_or_repo: str | os.PathLike, return_unused_kwargs: Literal[True], **kwargs: Any
    ) -> "tuple[PruningConfig, dict[str, Any]]": ...

    @classmethod
    def from_pretrained(
        cls, path_or_repo: str | os.PathLike, return_unused_kwargs: bool = False, **kwargs: Any
    ) -> "PruningConfig | tuple[PruningConfig, dict[str, Any]]":
        """Read ``pruning_config.json`` from a directory, a file or a Hub repository with Optimum's
        configuration-file lookup (``BaseConfig.get_config_dict``: ``revision``, ``cache_dir``,
        ``local_files_only`` ... as there).

        As with transformers' configs, the other keyword arguments override the stored fields
        (``from_pretrained(path, sparsity=0.6)``); one that names no field is an error, unless
        ``return_unused_kwargs`` asks for ``(config, unused)`` instead. Another ``method`` (or ``allocation``)
        without its own options drops the stored ones, which were the other method's.

        A local pruned model's directory without ``pruning_config.json`` (saved with the stock ``save_pretrained``,
        or exported by another tool) gives the recipe its ``config.json`` records as ``pruning_config``. Either is the
        last step of a model pruned in several, which is warned of (the steps are its ``pruning_history``)."""
        from .integrations.optimum import PruningConfigFile

        path = Path(path_or_repo)
        source = os.fspath(path_or_repo)
        folder = path / kwargs.get("subfolder", "")  # a local directory's files are read from there
        from_model_config = path.is_dir() and not (folder / CONFIG_NAME).is_file()
        if from_model_config:
            if not _records_recipe(folder / "config.json"):
                raise ValueError(
                    f"{str(folder)!r} has no {CONFIG_NAME} (nor a config.json recording a pruning_config); save one with "
                    "PruningConfig.save_pretrained"
                )
            source = os.fspath(folder / "config.json")
            kwargs = {key: value for key, value in kwargs.items() if key != "subfolder"}  # the file's path holds it
        local_file = folder / CONFIG_NAME if path.is_dir() and not from_model_config else Path(source)
        if local_file.is_file():  # Optimum reports bad JSON as an OSError without the reason
            _read_json_object(local_file)
        stored, overrides = PruningConfigFile.get_config_dict(source, **kwargs)
        if from_model_config:
            stored = stored["pruning_config"]
        if not isinstance(stored, Mapping):
            raise ValueError(f"{str(path_or_repo)!r}: {CONFIG_NAME} must contain a JSON object, got {type(stored).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unused = {key: value for key, value in overrides.items() if key not in fields}
        if unused and not return_unused_kwargs:
            raise TypeError(
                f"PruningConfig.from_pretrained got {', '.join(sorted(unused))}, which name no PruningConfig field and no "
                f"file-lookup option; fields: {', '.join(sorted(fields))}"
            )
        stored = {key: value for key, value in stored.items() if not key.startswith("_")}
        overrides = {key: value for key, value in overrides.items() if key in fields}
        if "sparsity" in overrides and "parts" not in overrides and isinstance(stored.get("parts"), Mapping):
            # a part stored at the config's sparsity (earlier versions wrote each out) follows the overriding one
            stored["parts"] = _checked_parts(stored["parts"], stored.get("sparsity", cls.sparsity))
        _check_sparsity_reaches_a_part(stored, overrides)
        for options in _options_replaced(stored, overrides):
            stored.pop(options, None)
        if from_model_config or is_recorded(stored):
            stored = _readable_record(stored, f"{source}'s pruning_config")
        config = cls.from_dict({**stored, **overrides})
        if path.is_dir() or (path.is_file() and path.name == CONFIG_NAME):  # a saved model's folder, or its recipe
            _warn_if_one_of_several_steps(folder if path.is_dir() else path.parent)
        return (config, unused) if return_unused_kwargs else config

    def replace(self, **changes: Any) -> "PruningConfig":
        """A copy with ``changes``, checked: ``dataclasses.replace``, except that another ``method`` (or ``allocation``)
        without its own options drops the current ones, which were the other method's (wanda's default
        ``comparison_group`` would be refused by sparsegpt), as ``from_pretrained``'s overrides do."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:  # dataclasses.replace names PruningConfig.__init__ and no field
            raise TypeError(f"PruningConfig.replace got {', '.join(unknown)}, which name no field; fields: {', '.join(sorted(fields))}")
        _check_sparsity_reaches_a_part(vars(self), changes)
        dropped = {options: {} for options in _options_replaced(vars(self), changes)}
        return dataclasses.replace(self, **dropped, **changes)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        text = self.to_json_string()  # checked before the file is opened: a refused config leaves no empty file
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "PruningConfig":
        """The config in a JSON file, read as ``from_pretrained`` reads it: one ``save_pretrained`` wrote as
        ``from_stored``, one written by hand checked as given."""
        data = _read_json_object(path)
        return cls.from_stored(data, os.fspath(path)) if is_recorded(data) else cls.from_dict(data)


def _check_sparsity_reaches_a_part(current: Mapping[str, Any], changes: Mapping[str, Any]) -> None:
    """A changed ``sparsity`` where every part in ``parts`` keeps a sparsity of its own would change nothing pruned."""
    parts = current.get("parts")
    if "sparsity" not in changes or "parts" in changes or not isinstance(parts, Mapping) or not parts:
        return
    if all(isinstance(policy, Mapping) and "sparsity" in policy for policy in parts.values()):
        own = ", ".join(f"{name} {policy['sparsity']!r}" for name, policy in parts.items())
        raise ValueError(
            f"PruningConfig.sparsity {changes['sparsity']!r} would reach no part: every part in PruningConfig.parts sets "
            f"its own ({own}); change parts instead, e.g. parts={{'language': {{'sparsity': ...}}}}"
        )


def _options_replaced(current: Mapping[str, Any], changes: Mapping[str, Any]) -> list[str]:
    """The option fields of ``current`` that ``changes`` leaves without their method (or allocation): another one is
    named and no options with it."""
    replaced = (("method", "method_options"), ("allocation", "allocation_options"))
    return [options for name, options in replaced if name in changes and changes[name] != current.get(name) and options not in changes]


def _readable_record(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``data`` without the settings ``_without_ignored_settings`` finds, said in one warning."""
    data, dropped = _without_ignored_settings(data)
    if dropped:
        logger.warning(
            "%s sets %s, which method %r does not read: the optimum-prune that wrote it accepted and ignored such "
            "settings, this one refuses them when given; read as unset", where, ", ".join(dropped), data.get("method"),
        )  # fmt: skip
    return data


def _without_ignored_settings(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``data`` without the options its method (or allocation) does not read, and those settings, as
    ``field.option=value``; a config naming no registered method is left to ``from_dict`` to refuse."""
    data, dropped = dict(data), []
    try:
        spec, allocation = METHODS.get(data.get("method")), ALLOCATIONS.get(data.get("allocation", "uniform"))
    except (ValueError, TypeError, KeyError):
        return data, dropped

    def drop(key: str, names: list[str]) -> None:
        values = data[key]
        dropped.extend(f"{key}.{name}={values[name]!r}" for name in names)
        data[key] = {name: value for name, value in values.items() if name not in names}

    for key, options_cls in (("method_options", spec.options), ("allocation_options", allocation.options), ("moe_options", MoEOptions)):
        if isinstance(data.get(key), Mapping):
            drop(key, ignored_options(options_cls, data[key]))
    if isinstance(data.get("method_options"), Mapping) and _every_target_a_pattern(data):
        drop("method_options", fraction_only_options(spec.options, data["method_options"]))
    moe = data.get("moe_options")
    if not isinstance(moe, Mapping):
        return data, dropped
    defaults = options_to_dict(MoEOptions())
    if spec.structured is not None:  # structured methods read no moe_options
        unread = tuple(defaults)
    elif spec.model_pruner is not None:  # one threshold over costs whose gradients carry the routing weights
        unread = ("routing_weighted", "expert_sparsity", "expert_deviation")
    else:
        try:
            data_free = not spec.needs_calibration(build_options(spec.options, data.get("method_options", {}), "method_options"))
        except (ValueError, TypeError):
            return data, dropped
        # what the routing of calibration tokens sets (expert_deviation with expert_sparsity)
        unread = ("routing_weighted", "unrouted_experts", "expert_sparsity", "expert_deviation") if data_free else ()
    drop("moe_options", [name for name in unread if name in moe and moe[name] != defaults[name]])
    return data, dropped


def _every_target_a_pattern(data: Mapping[str, Any]) -> bool:
    """Whether every part of a stored config prunes to an N:M pattern (as ``part_targets`` reads it)."""
    sparsity = data.get("sparsity", PruningConfig.sparsity)
    try:
        return all(isinstance(_target(policy.get("sparsity", sparsity)), NMPattern) for policy in (data.get("parts") or {"language": {}}).values())
    except (ValueError, TypeError, AttributeError):  # left to from_dict to refuse
        return False


def is_recorded(data: Mapping[str, Any]) -> bool:
    """Whether a stored config is one a run wrote (``save_pretrained`` stamps its versions beside the fields), not a
    recipe written by hand, which is checked as given."""
    return any(map(is_provenance, data))


def is_provenance(key: Any) -> bool:
    """Whether a key of a stored config is a version stamp (informative), not a field."""
    return key in PROVENANCE_KEYS or (isinstance(key, str) and key.endswith("_version") and key != "format_version")


def _warn_if_one_of_several_steps(folder: Path) -> None:
    """A model pruned in several steps keeps the last in ``pruning_config.json`` and all of them in its config.json:
    whoever repeats the recipe from the folder must know that the config read is only its last step."""
    try:
        model_config = _read_json_object(folder / "config.json")
    except (OSError, ValueError):  # no model beside the recipe, or one this reader does not need
        return
    steps = recorded_steps(SimpleNamespace(**model_config))
    if len(steps) > 1:
        logger.warning(
            "%s holds a model pruned in %d steps (%s); PruningConfig.from_pretrained gives the last one: to repeat them "
            "all, pass config.json's pruning_history to compress, e.g. compress(model, "
            "AutoConfig.from_pretrained(%r).pruning_history, calibration)",
            folder, len(steps), ", then ".join(f"{step.get('method')} {step.get('sparsity')}" for step in steps), str(folder),
        )  # fmt: skip


def _records_recipe(model_config_file: Path) -> bool:
    """Whether a model's ``config.json`` records the recipe that pruned it (``pruning_config``)."""
    if not model_config_file.is_file():
        return False
    return isinstance(_read_json_object(model_config_file).get("pruning_config"), Mapping)


def _read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    try:
        data = json.loads(read_text_file(Path(path), "JSON file"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must contain a JSON object, got {type(data).__name__}")
    return data


def recorded_steps(model_config: Any) -> list[dict[str, Any]]:
    """Every pruning step a model config records, in order (as dicts): its ``pruning_history``, and its
    ``pruning_config`` after them when that is another step (a checkpoint written before the history ended
    with the current config). Entries that are no step (a damaged or hand-edited ``config.json``) are left out,
    with a warning."""
    history = getattr(model_config, "pruning_history", None) or []
    entries = history if isinstance(history, list) else [history]
    steps = [step for step in entries if isinstance(step, Mapping)]
    current = getattr(model_config, "pruning_config", None)
    if len(steps) != len(entries) or (current and not isinstance(current, Mapping)):
        logger.warning("the model config's pruning_history / pruning_config hold entries that are no pruning step: left out")
        current = current if isinstance(current, Mapping) else None
    if current and (not steps or steps[-1] != current):
        steps.append(current)
    return steps


def as_pruning_config(config: PruningConfig | Mapping[str, Any], field: str = "config") -> PruningConfig:
    """``config`` as the entry points take it: a ``PruningConfig``, or a dict of its fields. A ``PruningConfig`` is
    checked again, as a copy: a field set after construction (``config.sparsity = 1.5``) skipped ``__post_init__``."""
    if isinstance(config, Mapping):
        return PruningConfig.from_dict(config)
    if not isinstance(config, PruningConfig):
        raise TypeError(f"{field} must be a PruningConfig or a dict, got {type(config).__name__}")
    return dataclasses.replace(config)


def readable_step(recorded: Mapping[str, Any] | None) -> PruningConfig | None:
    """A recorded step as a config, or None when there is none or another version wrote one this version cannot read."""
    try:
        return PruningConfig.from_stored(recorded) if recorded else None
    except (ValueError, TypeError):
        return None


def unreadable_reason(recorded: Mapping[str, Any]) -> str:
    """Why ``readable_step`` gives no config for ``recorded`` (a method registered by a module this process did not
    import, a file another version wrote), for a message."""
    try:
        PruningConfig.from_stored(recorded)
    except (ValueError, TypeError) as error:
        return str(error)
    return ""


def record_pruning(model_config: Any, config: PruningConfig) -> None:
    """``config`` as the model's ``pruning_config``; the earlier ones too, in order, when it was pruned before."""
    earlier = recorded_steps(model_config)
    model_config.pruning_config = config.to_dict()
    if earlier:
        model_config.pruning_history = [*earlier, model_config.pruning_config]
    elif hasattr(model_config, "pruning_history"):  # one that held no step
        del model_config.pruning_history


def _target(sparsity: float | str) -> SparsityTarget:
    return NMPattern.parse(sparsity) if isinstance(sparsity, str) else sparsity


MODEL_PARTS = ("vision", "projector", "language")
PART_POLICY_KEYS = ("sparsity",)


def _checked_parts(parts: Any, sparsity: float | str) -> dict[str, dict[str, Any]]:
    """Each part's policy, checked. A part without its own sparsity keeps none: it follows the config's, also
    when that changes later (``from_pretrained(path, sparsity=0.7)``, ``dataclasses.replace``); one equal to the
    config's is the same policy (earlier versions wrote every part's out) and is stored as none too."""
    if parts is None:  # a blank `parts:` in a YAML
        return {}
    if not isinstance(parts, Mapping):
        raise TypeError(f"PruningConfig.parts must map part names to policies, got {type(parts).__name__}")
    checked = {}
    for name, policy in parts.items():
        field_name = f"PruningConfig.parts[{name!r}]"
        if name not in MODEL_PARTS:
            raise ValueError(f"PruningConfig.parts has unknown part {name!r}; parts: {', '.join(MODEL_PARTS)}")
        if not isinstance(policy, Mapping):
            raise TypeError(f"{field_name} must be a mapping such as {{'sparsity': 0.5}}, got {policy!r}")
        unknown = sorted(set(policy) - set(PART_POLICY_KEYS), key=str)
        if unknown:
            raise ValueError(f"{field_name} has unknown key(s) {', '.join(map(str, unknown))}; valid keys: {', '.join(PART_POLICY_KEYS)}")
        own = {key: normalise_sparsity(value, f"{field_name}.{key}") for key, value in policy.items()}
        checked[name] = {key: value for key, value in own.items() if not (key == "sparsity" and value == sparsity)}
    return checked


def _complete_options(
    options_cls: type, values: Any, field_name: str, unknown_hint: Callable[[], str] | None = None
) -> dict[str, Any]:
    """``values`` checked and completed with the defaults; an error names ``field_name`` once: an options class's own
    check says ``method_options.round_to ...`` or ``num_layers ...``, which read ``PruningConfig.method_options.round_to
    ...`` and ``PruningConfig.method_options.num_layers ...`` (the translators into flags and YAML keys rename that)."""
    try:
        return options_to_dict(build_options(options_cls, values if values is not None else {}, field_name))
    except ValueError as error:
        message = str(error)
        owner, _, short_name = field_name.rpartition(".")
        first_word = message.split(" ", 1)[0]
        if message.startswith(f"{short_name}."):
            message = f"{owner}.{message}"
        elif first_word in {option.name for option in dataclasses.fields(options_cls)}:
            message = f"{field_name}.{message}"
        elif not message.startswith(field_name):
            message = f"{field_name}: {message}"
        if unknown_hint is not None and "unknown option" in message:
            message += f" ({unknown_hint()})"
        raise ValueError(message) from None


def _other_methods_options(method: str, values: Any) -> str:
    """For an unknown method option: the method the options were read for, and which methods take them."""
    if not isinstance(values, Mapping):
        return ""
    owners = {
        option: [name for name in METHODS if name != method and option in {f.name for f in dataclasses.fields(METHODS.get(name).options)}]
        for option in values
    }
    elsewhere = [f"{option} is an option of {', '.join(names)}" for option, names in owners.items() if names]
    defaults = [options_to_dict(METHODS.get(name).options()) for name in METHODS if name != method]
    if values and dict(values) in defaults:  # another method's defaults, as dataclasses.replace(config, method=...) leaves
        elsewhere.append("if the method was changed with dataclasses.replace, these are the other method's defaults: "
                         "the config's own replace(method=...) drops them, as does method_options={}")
    return "; ".join([f"method {method!r}", *elsewhere])
