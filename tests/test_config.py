import dataclasses
import functools
import json
import re
from typing import Literal

import numpy as np
import pytest

from optimum_prune import METHODS, NMPattern, PruningConfig


def test_round_trip_dict_and_json(tmp_path):
    config = PruningConfig(
        method="sparsegpt",
        sparsity="2:4",
        method_options={"block_size": 64},
        ignore=["*.o_proj"],
        num_calibration_samples=16,
        calibration_seq_len=256,
        seed=3,
    )
    assert config.method_options == {"block_size": 64, "dampening": 0.01, "saliency": "obs", "keep_zeros": False}
    assert PruningConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "pruning_config.json"
    config.to_json_file(path)
    assert PruningConfig.from_json_file(path) == config
    assert json.loads(path.read_text())["format_version"] == 1


def test_owl_round_trip_and_target():
    config = PruningConfig(method="wanda", sparsity=0.7, allocation="owl", allocation_options={"max_deviation": 0.1})
    assert PruningConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.allocation_options == {"outlier_threshold": 5.0, "max_deviation": 0.1}
    assert config.target == 0.7
    assert PruningConfig(sparsity=" 4 : 8 ").target == NMPattern(4, 8)
    assert PruningConfig(sparsity="0.5").sparsity == 0.5  # a number as text (command lines, quoted YAML)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, "1.5", "nan"])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(ValueError, match=r"PruningConfig\.sparsity must be in \[0, 1\)"):
        PruningConfig(sparsity=sparsity)


@pytest.mark.parametrize("pattern", ["4:2", "2:2", "0:4"])
def test_pattern_needs_n_below_m(pattern):
    with pytest.raises(ValueError, match="PruningConfig.sparsity .* needs 0 < N < M"):
        PruningConfig(sparsity=pattern)


@pytest.mark.parametrize("pattern", ["abc", "2:4:8", "2/4", ""])
def test_malformed_pattern(pattern):
    with pytest.raises(ValueError, match=r"PruningConfig\.sparsity .* is neither a fraction in \[0, 1\) nor an 'N:M' pattern"):
        PruningConfig(sparsity=pattern)


def test_sparsity_type():
    with pytest.raises(TypeError, match="PruningConfig.sparsity"):
        PruningConfig(sparsity=[0.5])


@pytest.mark.parametrize(("sparsity", "hint"), [(50, r"\(a percentage\? 50 % is 0.5\)$"), (1.5, r"got 1.5 \(a percentage\? 1.5 % is 0.015\)$"), (-0.1, r"got -0.1$")])
def test_an_out_of_range_sparsity_says_what_a_percentage_would_be(sparsity, hint):
    with pytest.raises(ValueError, match=r"PruningConfig.sparsity must be in \[0, 1\) .*" + hint):
        PruningConfig(sparsity=sparsity)


def test_unknown_method_lists_known():
    with pytest.raises(ValueError, match="PruningConfig.method 'wandaa' .* known: experts, kcm, kprune, layers, llm_surgeon, llm_surgeon_structured, low_rank, magnitude, mask_search, merge_experts, mpoe, slicegpt, sparsegpt, sublayers, wanda, width, ziplm"):
        PruningConfig(method="wandaa")
    assert {"magnitude", "wanda", "sparsegpt"} <= set(METHODS.names())


def test_unknown_and_invalid_method_options():
    with pytest.raises(ValueError, match="method_options has unknown option.*blocksize.*valid options: block_size, dampening.*\\(method 'sparsegpt'\\)$"):
        PruningConfig(method="sparsegpt", method_options={"blocksize": 64})
    with pytest.raises(ValueError, match=r"valid options: comparison_group \(method 'wanda'; block_size is an option of sparsegpt\)$"):
        PruningConfig(method_options={"block_size": 64})  # an option of another method than the default one
    with pytest.raises(ValueError, match=r"^PruningConfig.method_options.comparison_group must be one of"):
        PruningConfig(method="wanda", method_options={"comparison_group": "column"})  # was "method_options: comparison_group"
    with pytest.raises(ValueError, match=r"^PruningConfig.method_options.num_layers must be >= 0, got -1$"):
        PruningConfig(method="layers", method_options={"num_layers": -1})  # the CLI said "--option: num_layers"
    with pytest.raises(ValueError, match=r"^PruningConfig.allocation_options.max_deviation must be in \[0, 0.5\)"):
        PruningConfig(allocation="owl", allocation_options={"max_deviation": 0.6})
    with pytest.raises(TypeError, match="method_options.block_size must be int"):
        PruningConfig(method="sparsegpt", method_options={"block_size": "64"})
    with pytest.raises(ValueError, match=r"^PruningConfig\.method_options\.round_to must be >= 1, got 0$"):
        PruningConfig(method="width", sparsity=0.2, method_options={"round_to": 0})  # the options class's own check


def test_owl_with_nm_pattern_is_refused():
    with pytest.raises(ValueError, match="allocation 'owl' .* cannot be combined with the N:M pattern '2:4'"):
        PruningConfig(method="wanda", sparsity="2:4", allocation="owl")


def test_unknown_allocation_and_field():
    with pytest.raises(ValueError, match="PruningConfig.allocation 'best' .* known: owl, sensitivity, uniform"):
        PruningConfig(allocation="best")
    with pytest.raises(ValueError, match="no field.*sparsity_ratio"):
        PruningConfig.from_dict({"method": "wanda", "sparsity_ratio": 0.5})
    with pytest.raises(ValueError, match="format_version 2"):
        PruningConfig.from_dict({"format_version": 2})


def test_calibration_sizes_validated():
    with pytest.raises(ValueError, match="num_calibration_samples must be a positive integer"):
        PruningConfig(num_calibration_samples=0)
    with pytest.raises(ValueError, match="calibration_seq_len must be a positive integer"):
        PruningConfig(calibration_seq_len=-1)


@pytest.mark.parametrize("seed", [-(2**63) - 1, 2**64])
def test_a_seed_no_generator_takes_is_named(seed):
    with pytest.raises(ValueError, match=r"PruningConfig.seed must be in \[-2\*\*63, 2\*\*64\)"):
        PruningConfig(seed=seed)
    PruningConfig(seed=-1), PruningConfig(seed=2**64 - 1)  # what torch takes


def test_numpy_integers_are_integers_and_a_format_version_must_be_one():
    import numpy as np

    config = PruningConfig(num_calibration_samples=np.int64(8), seed=np.int32(2))
    assert (type(config.num_calibration_samples), type(config.seed)) == (int, int)
    assert PruningConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="format_version must be an integer, got '1'"):
        PruningConfig.from_dict({"format_version": "1"})


def test_numbers_are_stored_as_their_option_type_whatever_spelled_them():
    """7 from a command line or YAML saved as 7, Python's 7.0 as 7.0: the same setting, two different files."""
    import numpy as np

    given = PruningConfig(allocation="owl", allocation_options={"outlier_threshold": 7, "max_deviation": np.float32(0.25)})
    assert given.to_json_string() == PruningConfig(allocation="owl", allocation_options={"outlier_threshold": 7.0, "max_deviation": 0.25}).to_json_string()
    assert type(PruningConfig(method="layers", sparsity=np.float64(0.2), method_options={"num_layers": np.int64(2)}).method_options["num_layers"]) is int
    with pytest.raises(TypeError, match=r"PruningConfig.method_options.num_layers must be int, got 2.0"):
        PruningConfig(method="layers", method_options={"num_layers": 2.0})
    with pytest.raises(ValueError, match=r"PruningConfig.method_options has unknown option\(s\) 1, on; valid options"):
        PruningConfig(method="magnitude", method_options={1: "layer", "on": 1})  # a YAML's `1:` key


def test_a_blank_parts_section_is_no_parts():
    assert PruningConfig(parts=None).parts == {}


def test_malformed_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        PruningConfig.from_json_file(path)


def test_a_config_file_holding_no_object_is_named(tmp_path):
    (tmp_path / "pruning_config.json").write_text('["wanda"]')
    with pytest.raises(ValueError, match="pruning_config.json must contain a JSON object, got list"):
        PruningConfig.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="a pruning config is a mapping of PruningConfig fields, got list"):
        PruningConfig.from_dict(["wanda"])


def test_blank_ignore_and_undamped_sparsegpt():
    assert PruningConfig(ignore=None).ignore == []  # a blank `ignore:` in a YAML
    with pytest.raises(ValueError, match=r"dampening must be in \(0, 1\)"):
        PruningConfig(method="sparsegpt", method_options={"dampening": 0.0})


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"method": ["wanda"]}, r"PruningConfig.method must be one name \(one of .*wanda.*\), got \['wanda'\]"),
        ({"allocation": ["owl"]}, r"PruningConfig.allocation must be one name \(one of .*owl.*\), got \['owl'\]"),
        ({"ignore": 5}, r"PruningConfig.ignore must be a glob pattern or a list of them, got 5"),
        ({"ignore": {"*.o_proj"}}, r"PruningConfig.ignore must be a glob pattern or a list of them, got \{'\*.o_proj'\}"),  # JSON order
    ],
)
def test_a_field_of_the_wrong_type_is_named(fields, message):
    with pytest.raises(TypeError, match=message):
        PruningConfig(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(method="experts", method_options={"criterion": "frequency", "max_subsets": 5}), "max_subsets applies only with criterion='reconstruction', not criterion='frequency'"),
        (dict(method="mask_search", method_options={"tune": False, "damping": 0.5}), "damping applies only with tune=True, not tune=False"),
        (dict(method="kcm", method_options={"tune": False, "damping": 0.5}), "damping applies only with tune=True"),
        (dict(method="kprune", method_options={"tune": False, "damping": 0.5}), "damping applies only with tune=True"),
        (dict(method="kprune", method_options={"components": "mlp", "head_weight": 8.0}), "head_weight applies only with components='all'"),
        (dict(method="width", method_options={"components": "mlp", "head_mode": "kv_group"}), "head_mode applies only with components='all' or 'attention'"),
        (dict(method="ziplm", method_options={"target": "parameters", "latency_tokens": 64}), "latency_tokens applies only with target='latency'"),
        (dict(method="wanda", moe_options={"expert_deviation": 0.3}), "moe_options.expert_deviation applies only with expert_sparsity='load'"),
    ],
)  # fmt: skip
def test_an_option_the_chosen_mode_would_ignore_is_refused(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PruningConfig(**fields)


def test_options_at_their_defaults_load_whatever_the_mode_and_the_help_says_when_they_apply():
    """Saved configs hold every option (completed with defaults): those must keep loading."""
    from optimum_prune.methods.experts import ExpertPruningOptions
    from optimum_prune.options import describe_options

    config = PruningConfig(method="experts", method_options={"criterion": "frequency"})
    assert PruningConfig.from_dict(config.to_dict()) == config
    help_text = dict((name, text) for name, _, text in describe_options(ExpertPruningOptions))["max_subsets"]
    assert help_text.endswith("else remove experts greedily. Only with criterion='reconstruction'.")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(method="experts", moe_options={"prune_router": True}), "structured method 'experts' does not read them"),
        (dict(method="llm_surgeon", moe_options={"expert_sparsity": "load"}), "expert_sparsity='load' and routing_weighted=False do not apply"),
        (dict(method="llm_surgeon", moe_options={"routing_weighted": False}), "routing_weighted=False do not apply"),
        (dict(method="kprune", method_options={"predictive_weight": 0.0, "representational_weight": 0.0}), "are both 0"),
        (dict(method="wanda", allocation="owl", allocation_options={"outlier_threshold": float("inf")}), "outlier_threshold must be a finite number"),
    ],
)  # fmt: skip
def test_settings_a_method_does_not_read_are_refused(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PruningConfig(**fields)


def test_a_language_only_method_takes_its_sparsity_once():
    """Its errors and report name PruningConfig.sparsity: a different value under parts made them name the wrong field."""
    with pytest.raises(ValueError, match=re.escape("PruningConfig.parts['language'].sparsity 0.01 differs from PruningConfig.sparsity 0.5")):
        PruningConfig(method="layers", sparsity=0.5, parts={"language": {"sparsity": 0.01}})
    assert PruningConfig(method="layers", sparsity=0.3, parts={"language": {}}).part_targets() == {"language": 0.3}


def test_registering_again_replaces_only_the_same_class():
    """A reloaded module (a notebook's autoreload) registers its class again; another class may not take the name."""
    from optimum_prune.registry import Registry

    registry = Registry("thing", "field")

    class First:
        pass

    registry.add("one", 1, First)
    registry.add("one", 2, First)
    assert registry.get("one") == 2

    class Other:
        pass

    with pytest.raises(ValueError, match=r"thing 'one' is already registered \(by tests.test_config.*First\)"):
        registry.add("one", 3, Other)
    registry.add("two", 4, functools.partial(Other))  # any callable registers, e.g. an adapter factory


def test_options_are_typed_by_their_annotation_and_other_kinds_are_refused_at_registration():
    """An option's type came from its default: `int | None = None` refused 64; a tuple default broke the JSON
    round trip of the config. Options are JSON scalars, optionally None, checked when the class is registered."""
    import dataclasses

    from optimum_prune.methods import LayerPruner
    from optimum_prune.methods.base import MethodSpec
    from optimum_prune.options import build_options, option

    @dataclasses.dataclass(frozen=True)
    class Blocks:
        block_size: int | None = option(None, "columns per block (None: the whole row)")
        scale: float = option(1.0, "a scale")

    assert build_options(Blocks, {"block_size": 64, "scale": 2}, "method_options").block_size == 64
    assert build_options(Blocks, {"block_size": None}, "method_options").block_size is None
    with pytest.raises(TypeError, match="method_options.block_size must be int, got '64'"):
        build_options(Blocks, {"block_size": "64"}, "method_options")

    @dataclasses.dataclass(frozen=True)
    class Layers:
        layers: tuple = option((1, 2), "layers to keep")

    with pytest.raises(TypeError, match=r"Layers.layers: an option is a bool, int, float or str \(or one of them \| None\)"):
        MethodSpec("keep", Layers, "", pruner=LayerPruner)

    @dataclasses.dataclass(frozen=True)
    class Norms:
        norm: Literal["l1", "l2"] = option("l1", "which norm")

    assert build_options(Norms, {"norm": "l2"}, "method_options").norm == "l2"
    with pytest.raises(TypeError, match="method_options.norm must be str, got 2"):
        build_options(Norms, {"norm": 2}, "method_options")
    with pytest.raises(ValueError, match=r"method_options.norm must be one of \('l1', 'l2'\), got 'l3'"):
        build_options(Norms, {"norm": "l3"}, "method_options")  # was stored as given

    @dataclasses.dataclass(frozen=True)
    class WrongDefault:
        norm: Literal["l1", "l2"] = option("L1", "which norm")

    with pytest.raises(TypeError, match=r"WrongDefault.norm's default must be one of \('l1', 'l2'\), got 'L1'"):
        MethodSpec("wrong_default", WrongDefault, "", pruner=LayerPruner)  # was stored in every config, refused on reading it back

    @dataclasses.dataclass(frozen=True)
    class TextForNumber:
        rank: int = option("8", "a rank")

    with pytest.raises(TypeError, match="TextForNumber.rank's default must be int, got '8'"):
        MethodSpec("text_for_number", TextForNumber, "", pruner=LayerPruner)

    class Plain:
        scale = 1.0

    with pytest.raises(TypeError, match=r"Plain: an options class is a dataclass .* option\(default, help\)"):
        MethodSpec("plain", Plain, "", pruner=LayerPruner)


def test_a_bool_is_not_an_int_option_and_none_is_only_for_optional_options():
    with pytest.raises(TypeError, match="method_options.block_size must be int, got True"):
        PruningConfig(method="sparsegpt", method_options={"block_size": True})  # YAML `yes`, CLI `true`: not 1
    with pytest.raises(TypeError, match="moe_options.prune_router must be bool, got None"):
        PruningConfig(method="wanda", moe_options={"prune_router": None})  # would read as False


def test_numpy_bools_are_read_as_bools_like_numpy_ints_and_floats():
    """np.int64 / np.float32 option values become Python's; np.bool_ was refused ("must be bool, got np.True_")."""
    config = PruningConfig(method="sparsegpt", method_options={"keep_zeros": np.bool_(True), "block_size": np.int64(64)},
                           moe_options={"prune_router": np.False_})
    assert config.method_options["keep_zeros"] is True and config.moe_options["prune_router"] is False
    assert '"keep_zeros": true' in config.to_json_string()
    with pytest.raises(TypeError, match="block_size must be int, got True"):
        PruningConfig(method="sparsegpt", method_options={"block_size": np.bool_(True)})


def test_expert_deviation_half_is_refused():
    with pytest.raises(ValueError, match=r"expert_deviation must be in \[0, 0.5\)"):
        PruningConfig(method="wanda", moe_options={"expert_sparsity": "load", "expert_deviation": 0.5})


def test_a_key_that_is_not_a_string_is_named_as_an_unknown_field():
    """YAML reads an unquoted `on:` as True: sorting it among the strings raised a TypeError."""
    for data in ({True: 1}, {1: "a", "sparsty": 0.5}):
        with pytest.raises(ValueError, match="PruningConfig has no field"):
            PruningConfig.from_dict(data)


def test_llm_surgeon_takes_its_sparsity_once_and_prunes_the_language_model_only():
    with pytest.raises(ValueError, match=r"PruningConfig.parts\['language'\].sparsity 0.3 differs from PruningConfig.sparsity 0.5"):
        PruningConfig(method="llm_surgeon", sparsity=0.5, parts={"language": {"sparsity": 0.3}})
    with pytest.raises(ValueError, match="use allocation='uniform' and no other parts"):
        PruningConfig(method="llm_surgeon", parts={"language": {}, "vision": {}})


def test_an_nm_pattern_of_another_part_is_refused_with_a_varying_allocation():
    with pytest.raises(ValueError, match="allocation 'owl' varies sparsity per layer and cannot be combined with the N:M pattern '2:4'"):
        PruningConfig(method="wanda", sparsity=0.5, allocation="owl", parts={"language": {}, "vision": {"sparsity": "2:4"}})


def test_ignore_given_as_a_tuple_or_one_string_is_stored_as_a_list_and_round_trips(tmp_path):
    config = PruningConfig(ignore=("*.o_proj",))
    assert config.ignore == ["*.o_proj"]
    assert PruningConfig(ignore="*.o_proj") == config  # one pattern, as verify_sparsity and PruningCallback read one
    config.to_json_file(tmp_path / "c.json")
    assert PruningConfig.from_json_file(tmp_path / "c.json") == config


@pytest.mark.parametrize("field", ["num_calibration_samples", "calibration_seq_len", "seed"])
@pytest.mark.parametrize("value", [True, 1.5, "1"])
def test_an_integer_field_of_another_type_is_one_type_error(field, value):
    """The three integers fail alike (a float seed was a TypeError, a float sequence length a ValueError)."""
    with pytest.raises(TypeError, match=f"PruningConfig.{field} must be int, got {value!r}"):
        PruningConfig(**{field: value})


def test_numpy_integers_are_taken_and_the_lowest_seed_torch_takes_is_taken():
    config = PruningConfig(num_calibration_samples=np.int64(4), seed=np.uint64(2**64 - 1))
    assert (config.num_calibration_samples, config.seed) == (4, 2**64 - 1) and type(config.seed) is int
    assert PruningConfig(seed=-(2**63)).seed == -(2**63)


def test_blank_option_sections_of_a_yaml_are_the_defaults():
    config = PruningConfig(method="sparsegpt", method_options=None, moe_options=None, allocation="owl", allocation_options=None)
    assert config == PruningConfig(method="sparsegpt", allocation="owl")


def test_a_step_with_a_field_of_the_wrong_type_is_no_readable_step():
    from optimum_prune.config import readable_step

    assert readable_step({"method": ["wanda"]}) is None
    assert readable_step({"method": "wanda", "ignore": 5}) is None


def test_a_config_json_whose_pruning_config_is_no_mapping_records_no_recipe(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "pruning_config": "wanda"}))
    with pytest.raises(ValueError, match=r"has no pruning_config.json \(nor a config.json recording a pruning_config\)"):
        PruningConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("version", [0, -1])
def test_an_older_or_invalid_format_version_is_refused(version):
    with pytest.raises(ValueError, match=f"format_version {version} is not supported"):
        PruningConfig.from_dict({"format_version": version})


def test_version_stamps_a_later_release_adds_are_read_as_provenance():
    """The optimum_prune_version stamp made this release's files unreadable to the one before (an unknown field): any
    ``*_version`` key is informative, so a later release's stamps are not; fields stay checked."""
    config = PruningConfig(method="wanda", sparsity=0.4)
    assert PruningConfig.from_dict({**config.to_dict(), "optimum_prune_version": "9", "kernels_version": "2"}) == config
    with pytest.raises(ValueError, match="has no field"):
        PruningConfig.from_dict({**config.to_dict(), "sparsities": 0.4})


def test_overriding_with_the_stored_method_or_allocation_keeps_their_stored_options(tmp_path):
    """Only another method (allocation) drops the stored options; naming the same one kept resetting them."""
    PruningConfig(
        method="sparsegpt", method_options={"block_size": 32}, allocation="owl", allocation_options={"max_deviation": 0.2}
    ).save_pretrained(tmp_path)
    config = PruningConfig.from_pretrained(tmp_path, method="sparsegpt", allocation="owl", sparsity=0.6)
    assert (config.method_options["block_size"], config.allocation_options["max_deviation"], config.sparsity) == (32, 0.2, 0.6)


def test_a_config_changed_after_construction_is_written_as_it_reads_back(tmp_path):
    """to_json_file and save_pretrained wrote `sparsity: 1.5`, which from_json_file and from_pretrained refused."""
    config = PruningConfig(method="magnitude")
    config.sparsity = NMPattern(2, 4)
    config.save_pretrained(tmp_path)
    assert PruningConfig.from_pretrained(tmp_path).sparsity == "2:4"
    config.sparsity = 1.5
    with pytest.raises(ValueError, match="PruningConfig.sparsity must be in"):
        config.to_json_file(tmp_path / "config.json")
    with pytest.raises(ValueError, match="PruningConfig.sparsity must be in"):
        config.save_pretrained(tmp_path / "other")
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "other").exists()


def test_replace_with_another_method_drops_the_old_methods_options_as_from_pretrained_does():
    wanda = PruningConfig(method="wanda", sparsity=0.5, allocation="owl")
    assert wanda.replace(method="magnitude") == PruningConfig(method="magnitude", sparsity=0.5, allocation="owl")
    assert wanda.replace(method="sparsegpt").method_options == PruningConfig(method="sparsegpt").method_options
    assert wanda.replace(allocation="uniform", sparsity="2:4").allocation_options == {}
    sparsegpt = PruningConfig(method="sparsegpt", method_options={"block_size": 32})
    assert sparsegpt.replace(sparsity=0.6).method_options["block_size"] == 32  # the same method keeps its options
    assert sparsegpt.replace(method="wanda", method_options={"comparison_group": "layer"}).method_options == {"comparison_group": "layer"}
    with pytest.raises(ValueError, match="PruningConfig.sparsity"):
        sparsegpt.replace(sparsity=1.5)
    with pytest.raises(TypeError, match="PruningConfig.replace got sparsty, which name no field; fields: allocation, "):
        sparsegpt.replace(sparsty=0.6)  # named PruningConfig.__init__ and no field
    with pytest.raises(ValueError, match=r"comparison_group is an option of magnitude, wanda.*the config's own replace\(method=\.\.\.\)"):
        dataclasses.replace(wanda, method="sparsegpt")
    with pytest.raises(ValueError) as by_hand:  # not another method's defaults: no word of dataclasses.replace
        PruningConfig(method="sparsegpt", method_options={"comparison_group": "row"})
    assert "comparison_group is an option of magnitude, wanda)" in str(by_hand.value)


def test_a_stored_key_marked_private_is_passed_over_by_from_pretrained(tmp_path):
    stored = {**PruningConfig(method="magnitude", sparsity=0.3).to_dict(), "_commit_hash": "abc123"}
    (tmp_path / "pruning_config.json").write_text(json.dumps(stored))
    assert PruningConfig.from_pretrained(tmp_path) == PruningConfig(method="magnitude", sparsity=0.3)


def test_a_load_deviation_of_zero_is_taken():
    config = PruningConfig(method="wanda", moe_options={"expert_sparsity": "load", "expert_deviation": 0.0})
    assert config.build_moe_options().expert_deviation == 0.0


def test_an_option_typed_optional_takes_none_and_its_type():
    """Plugins' options may be typing.Optional (typing.Union), not only `int | None`."""
    import dataclasses
    from typing import Optional

    from optimum_prune.options import build_options, option

    @dataclasses.dataclass(frozen=True)
    class Blocks:
        block_size: Optional[int] = option(None, "columns per block")

    assert build_options(Blocks, {"block_size": None}, "method_options").block_size is None
    assert build_options(Blocks, {"block_size": 64}, "method_options").block_size == 64



def test_a_float_option_past_float_range_is_a_value_error():
    """A 400-digit integer (from a YAML or --moe-option) raised OverflowError from math.isfinite."""
    with pytest.raises(ValueError, match="moe_options.expert_deviation must be a finite number"):
        PruningConfig(moe_options={"expert_deviation": 10**400})


def test_a_non_utf8_pruning_config_is_named(tmp_path):
    config = tmp_path / "pruning_config.json"
    config.write_bytes(b'{"method": "wanda", "note": "' + "café".encode("latin-1") + b'"}')
    with pytest.raises(ValueError, match="pruning_config.json"):  # was: "'utf-8' codec can't decode byte 0xe9 ..."
        PruningConfig.from_json_file(config)
    with pytest.raises(ValueError, match="pruning_config.json"):
        PruningConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "method, options, moe_options, dropped",
    [
        ("magnitude", {}, {"routing_weighted": False, "unrouted_experts": "dense"}, ["moe_options.routing_weighted", "moe_options.unrouted_experts"]),
        ("mask_search", {"tune": False, "damping": 0.05}, {}, ["method_options.damping"]),
        ("width", {}, {"expert_sparsity": "load"}, ["moe_options.expert_sparsity"]),
        ("wanda", {}, {"expert_deviation": 0.3}, ["moe_options.expert_deviation"]),
        ("llm_surgeon", {}, {"routing_weighted": False}, ["moe_options.routing_weighted"]),
        ("magnitude", {}, {"expert_sparsity": "load", "expert_deviation": 0.3}, ["moe_options.expert_sparsity", "moe_options.expert_deviation"]),
        ("kprune", {"predictive_weight": 0.0, "temperature": 1.0, "teacher_top_k": 16}, {}, ["method_options.temperature", "method_options.teacher_top_k"]),
    ],
)
def test_a_stored_config_with_settings_its_method_ignores_reads_without_them(tmp_path, caplog, method, options, moe_options, dropped):
    """An earlier version accepted (and ignored) them; this one refuses them when given, which made the recipes it
    wrote unreadable: from_pretrained, from_json_file and a model's record read them as unset, with a warning."""
    import logging

    stored = PruningConfig(method=method, sparsity=0.3).to_dict()
    stored["method_options"] = {**stored["method_options"], **options}
    stored["moe_options"] = {**stored["moe_options"], **moe_options}
    (tmp_path / "pruning_config.json").write_text(json.dumps({**stored, "optimum_version": "2.1.0"}))  # save_pretrained's stamp
    expected = PruningConfig(method=method, sparsity=0.3, method_options={k: v for k, v in options.items() if f"method_options.{k}" not in dropped})
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        assert PruningConfig.from_pretrained(tmp_path) == expected
        assert PruningConfig.from_stored(stored) == expected  # a model's record
        assert PruningConfig.from_json_file(tmp_path / "pruning_config.json") == expected
    assert all(name in caplog.text for name in dropped) and "the optimum-prune that wrote it accepted and ignored" in caplog.text
    (tmp_path / "recipe.json").write_text(json.dumps(stored))  # written by hand: checked as given
    for read in (PruningConfig.from_dict, lambda data: PruningConfig.from_json_file(tmp_path / "recipe.json")):
        with pytest.raises(ValueError):
            read(stored)
    (tmp_path / "pruning_config.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError):
        PruningConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("method, group", [("wanda", "layer"), ("magnitude", "output")])
def test_comparison_group_is_refused_where_every_target_is_an_nm_pattern(tmp_path, caplog, method, group):
    """An N:M pattern ranks within its groups of M inputs: the setting left the weights bit-identical, without a word."""
    import logging

    options = {"comparison_group": group}
    message = r"^PruningConfig.method_options.comparison_group applies to a fractional sparsity; the N:M pattern '2:4'"
    with pytest.raises(ValueError, match=message):
        PruningConfig(method=method, sparsity="2:4", method_options=options)
    with pytest.raises(ValueError, match=message):
        PruningConfig(method=method, sparsity=0.5, parts={"language": {"sparsity": "2:4"}}, method_options=options)
    PruningConfig(method=method, sparsity=0.5, parts={"vision": {}, "language": {"sparsity": "2:4"}}, method_options=options)  # the vision tower reads it
    stored = {**PruningConfig(method=method, sparsity="2:4").to_dict(), "method_options": options, "optimum_version": "2.1.0"}
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        assert PruningConfig.from_stored(stored) == PruningConfig(method=method, sparsity="2:4")  # an earlier version's record
    assert f"method_options.comparison_group={group!r}" in caplog.text


def test_a_sparsity_change_that_reaches_no_part_is_refused(tmp_path):
    """Every part kept a sparsity of its own: from_pretrained(path, sparsity=0.7) and replace(sparsity=0.7) changed
    nothing pruned, without a word."""
    config = PruningConfig(method="wanda", sparsity=0.5, parts={"language": {"sparsity": 0.6}})
    config.save_pretrained(tmp_path)
    message = r"^PruningConfig.sparsity 0.7 would reach no part: every part in PruningConfig.parts sets its own \(language 0.6\)"
    with pytest.raises(ValueError, match=message):
        config.replace(sparsity=0.7)
    with pytest.raises(ValueError, match=message):
        PruningConfig.from_pretrained(tmp_path, sparsity=0.7)
    assert config.replace(sparsity=0.7, parts={}).part_targets() == {"language": 0.7}
    mixed = PruningConfig(method="wanda", sparsity=0.5, parts={"vision": {}, "language": {"sparsity": 0.6}})
    assert mixed.replace(sparsity=0.7).part_targets() == {"vision": 0.7, "language": 0.6}  # the vision tower follows it


def test_a_sparsity_override_reaches_a_stored_part_whose_sparsity_is_the_configs(tmp_path):
    """Earlier versions wrote every part's sparsity out: a stored language part at the config's 0.5 follows it, as
    replace() read it, but from_pretrained(path, sparsity=0.6) refused the file as reaching no part."""
    data = {"method": "magnitude", "sparsity": 0.5, "parts": {"language": {"sparsity": 0.5}, "vision": {"sparsity": 0.3}}}
    (tmp_path / "pruning_config.json").write_text(json.dumps(data))
    assert PruningConfig.from_pretrained(tmp_path, sparsity=0.6).part_targets() == {"language": 0.6, "vision": 0.3}
