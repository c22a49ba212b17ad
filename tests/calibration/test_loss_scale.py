"""fp16 gradient passes: the loss scale against fp32 references, and its back-off on overflow."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from optimum_prune import PruningConfig, prune
from optimum_prune.adapters import get_adapter
from optimum_prune.calibration import gradients
from optimum_prune.calibration.gradients import calibration_gradients, fisher_rows, hessian_traces
from optimum_prune.methods.kprune import KPrune
from optimum_prune.methods.llm_surgeon import kfac_factors
from optimum_prune.methods.mask_search import MaskSearch, MaskSearchOptions, mask_fisher

from ..conftest import tiny_model, token_windows


def taylor(model, windows):
    parameters = [layer.mlp.down_proj.weight for layer in model.model.layers]
    with calibration_gradients(model, windows, parameters):
        return [p.grad for p in parameters]


def fisher(model, windows):
    return fisher_rows(model, windows, [layer.self_attn.o_proj for layer in model.model.layers])


def traces(model, windows):
    return [torch.tensor(hessian_traces(model, windows, [[layer.mlp.up_proj.weight] for layer in model.model.layers]))]


def curvature(model, windows):
    return [g for g, _ in kfac_factors(model, windows, [layer.mlp.down_proj for layer in model.model.layers]).values()]


def masks(model, windows):
    method = MaskSearch(get_adapter(model), 0.2, [], MaskSearchOptions(), torch.device("cpu"))
    method.check()
    return mask_fisher(method.adapter, method.units.components, windows, per_window=False)


class _Scored(Exception):
    pass


def knowledge(model, windows):
    """K-prune's knowledge scores of the first layer's units (the pass stops there)."""
    scores = []
    original = KPrune._knowledge_scores

    def first_scores(self, *args):
        scores.extend(original(self, *args))
        raise _Scored

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KPrune, "_knowledge_scores", first_scores)
        with pytest.raises(_Scored):
            prune(model, PruningConfig(method="kprune", sparsity=0.2), calibration=windows)
    return scores


PASSES = {"taylor": taylor, "fisher": fisher, "hessian traces": traces, "k-fac": curvature, "mask fisher": masks, "k-prune": knowledge}


def relative_error(results, references) -> float:
    return max(float((r.double() - e.double()).norm() / e.double().norm()) for r, e in zip(results, references))


def models():
    """A tiny model whose gradients sit below fp16's normal range (≈1e-7: a head scaled by 1e-3), and its fp16 copy."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e-3)
    return model, copy.deepcopy(model).half()


@pytest.mark.parametrize("name", PASSES)
def test_fp16_passes_match_fp32_with_the_loss_scale_and_back_off_on_overflow(name, monkeypatch, caplog):
    model, half = models()
    windows = token_windows(samples=2)
    run = PASSES[name]
    reference = run(model, windows)
    assert relative_error(run(half, windows), reference) < 0.03
    monkeypatch.setattr(gradients, "FP16_LOSS_SCALE", 2.0**40)  # overflows fp16: backs off 16× at a time until finite
    with caplog.at_level(logging.WARNING, logger=gradients.__name__):
        assert relative_error(run(half, windows), reference) < 0.03
    ours = [record for record in caplog.records if record.name.startswith("optimum_prune")]  # not transformers' own (INFO after other tests)
    assert ours and all("overflowed" in record.getMessage() for record in ours)
    if name != "k-prune":  # its scores here are dominated by the representational term, a forward statistic
        monkeypatch.setattr(gradients, "FP16_LOSS_SCALE", 1.0)
        assert relative_error(run(half, windows), reference) > 0.03  # what the scale is for: unscaled, the bound fails


def test_only_fp16_models_are_scaled_and_each_overflow_divides_the_scale_by_16():
    scales = []

    def overflowing_twice(scale: float) -> str | None:
        scales.append(scale)
        return "done" if len(scales) > 2 else None

    model = tiny_model()
    assert gradients.with_loss_scale(model, lambda scale: scales.append(scale) or "done") == "done" and scales == [1.0]
    scales.clear()
    assert gradients.with_loss_scale(model.to(torch.bfloat16), lambda scale: scales.append(scale) or "done") == "done" and scales == [1.0]
    scales.clear()
    assert gradients.with_loss_scale(model.half(), overflowing_twice) == "done" and scales == [2.0**12, 2.0**8, 2.0**4]
    assert gradients.overflowed([1.0, torch.tensor([0.0, float("nan")])]) and not gradients.overflowed([1.0, torch.ones(2)])
    # Still not finite at scale 1 (the fp16 double backward of the sensitivity allocation did): what would be ranked
    # by is not a number, which sorted() took in the input order
    for dtype, hint in ((torch.float16, r"overflows in torch.float16; prune it in float32 \(model.float\(\)\) or bfloat16"), (torch.float32, "overflows in torch.float32; look for non-finite weights, or method options that scale the loss")):
        scales.clear()
        with pytest.raises(ValueError, match=f"not finite even at loss scale 1: the model's gradient pass {hint}"):
            gradients.with_loss_scale(model.to(dtype), lambda scale: scales.append(scale))
        assert scales[-1] == 1.0
