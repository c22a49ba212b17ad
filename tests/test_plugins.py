"""Installed packages register methods through the ``optimum_prune.plugins`` entry-point group."""

import os
import subprocess
import sys

import pytest


def _install(site, module: str, source: str) -> None:
    """A distribution on ``site`` declaring ``module`` as an optimum-prune plugin, as pip would lay it out."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[optimum_prune.plugins]\n{module} = {module}\n")


COLUMN_NORMS = '''
from optimum_prune import register_method
from optimum_prune.methods import LayerPruner


@register_method("column_norms")
class ColumnNorms(LayerPruner):
    """Prune the weights of the smallest input columns (a plugin's method)."""

    @classmethod
    def needs_calibration(cls, options):
        return False

    def prune(self, target):
        pass
'''


def test_an_installed_plugin_reaches_the_api_and_the_console_script_and_a_broken_one_is_skipped(tmp_path):
    _install(tmp_path, "column_norms_plugin", COLUMN_NORMS)
    _install(tmp_path, "broken_plugin", "raise RuntimeError('no GPU here')\n")
    environment = {**os.environ, "PYTHONPATH": str(tmp_path)}
    imported = subprocess.run(
        [sys.executable, "-c", "import optimum_prune; print('column_norms' in optimum_prune.METHODS.names())"],
        capture_output=True, text=True, env=environment,
    )  # fmt: skip
    assert imported.stdout.strip() == "True", imported.stderr
    assert "plugin 'broken_plugin' (broken_plugin) could not be imported and is skipped: RuntimeError: no GPU here" in imported.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "optimum_prune.cli", "--help"], capture_output=True, text=True, env=environment
    )
    assert "column_norms" in shown.stdout and "a plugin's method" in shown.stdout


def test_a_method_drawing_at_random_draws_from_the_configs_seed(scratch_methods):
    """PruningConfig.seed reached structured methods only: a LayerPruner had no seed to draw from."""
    import torch

    from optimum_prune import PruningConfig, prune, register_method
    from optimum_prune.masks import prunable_linears
    from optimum_prune.methods import LayerPruner

    from .conftest import tiny_model

    @register_method("random_control")
    class RandomControl(LayerPruner):
        """Prune weights drawn at random (a control)."""

        @classmethod
        def needs_calibration(cls, options):
            return False

        def prune(self, target):
            draws = torch.rand(self.linear.weight.shape, generator=torch.Generator().manual_seed(self.seed))
            self.apply_mask(draws < target)

    def zeros(seed: int) -> dict[str, torch.Tensor]:
        model = tiny_model()
        prune(model, PruningConfig(method="random_control", sparsity=0.5, seed=seed))
        return {name: linear.weight == 0 for name, linear in prunable_linears(model).items()}

    first, again, other = zeros(0), zeros(0), zeros(1)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not any(torch.equal(first[name], other[name]) for name in first)
    assert not torch.equal(first["model.layers.0.self_attn.q_proj"], first["model.layers.1.self_attn.q_proj"])


@pytest.mark.parametrize("decorator", ["register_method", "register_structured_method", "register_model_method", "register_allocation"])
def test_a_registering_decorator_without_its_name_is_refused(decorator, scratch_methods):
    """Used bare, it replaced the class by its inner function and registered nothing."""
    import optimum_prune

    with pytest.raises(TypeError, match=rf"{decorator} takes the name to register: @{decorator}\("):

        @getattr(optimum_prune, decorator)
        class Mine:
            pass


def test_what_the_readme_tells_a_plugin_to_import_is_there():
    from optimum_prune import register_adapter, register_allocation, register_method, register_model_method, register_structured_method
    from optimum_prune.adapters import DecoderStackAdapter
    from optimum_prune.adapters.llama import LlamaAdapter
    from optimum_prune.allocation import Allocation
    from optimum_prune.methods import LayerPruner, ModelPruner, StructuredMethod
    from optimum_prune.options import option

    assert issubclass(LlamaAdapter, DecoderStackAdapter) and callable(option) and Allocation and LayerPruner
    assert all(map(callable, (register_adapter, register_allocation, register_method, register_model_method, register_structured_method)))
    assert ModelPruner and StructuredMethod
    from optimum_prune import NMPattern, UnsupportedArchitecture
    from optimum_prune.adapters import AttentionLayout, MLPLayout, ResidualBranch
    from optimum_prune.distributed import all_reduce_sum
    from optimum_prune.methods import zero_shares_per_row
    from optimum_prune.sparsity import SparsityTarget, select_mask
    from optimum_prune.structure.shapes import LayerShape

    assert all(map(callable, (all_reduce_sum, select_mask, zero_shares_per_row))) and SparsityTarget and NMPattern
    assert issubclass(UnsupportedArchitecture, ValueError) and AttentionLayout and MLPLayout and ResidualBranch and LayerShape


def test_load_plugins_names_only_the_plugins_it_imported(monkeypatch, caplog):
    from importlib.metadata import EntryPoint

    from optimum_prune import plugins

    entries = [EntryPoint("good", "json", plugins.GROUP), EntryPoint("broken", "no_such_module_for_tests", plugins.GROUP)]
    monkeypatch.setattr(plugins, "entry_points", lambda group: entries if group == plugins.GROUP else [])
    with caplog.at_level("WARNING", logger="optimum_prune"):
        assert plugins.load_plugins() == ["good"]
    assert "plugin 'broken' (no_such_module_for_tests) could not be imported and is skipped" in caplog.text

