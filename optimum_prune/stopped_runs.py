"""A model that a pruning step stopped part-way through: its weights match neither the model it was nor its config
(a structured step rewrites the config only once it finishes), so saving, pruning or training it again is refused
until it is loaded again; one that the step had not changed yet is left as it was, and said to be."""

from __future__ import annotations

import weakref

from torch import nn

from .report import PruningReport

_STOPPED = "_optimum_prune_stopped"


class ParameterVersions:
    """Which parameter objects a model holds and their in-place version counters: pruning either zeroes weights in
    place (the counter moves) or replaces them (another object), so a comparison tells whether a step touched any
    weight without reading one (an assignment to ``.data`` moves no counter: methods change weights with in-place ops).
    Inference tensors (a model made under ``torch.inference_mode()``) keep no counter. A method that tries weights in
    place and puts them back (ZipLM's search) still reads as changed: what was put back is not read either."""

    def __init__(self, model: nn.Module) -> None:
        # Weak references: a replaced weight is freed as it would be (a strong one would hold every replaced weight of
        # a structured run), and a dead reference says it was replaced; ids of live objects cannot be reused.
        self.parameters = [(weakref.ref(parameter), _version(parameter)) for parameter in model.parameters()]

    def changed(self, model: nn.Module) -> bool | None:
        """Whether any weight changed; None where an inference tensor cannot say."""
        held = [(reference(), version) for reference, version in self.parameters]
        now = list(model.parameters())
        if {id(parameter) for parameter, _ in held} != {id(parameter) for parameter in now} or any(
            parameter is None or (version is not None and _version(parameter) != version) for parameter, version in held
        ):
            return True
        return None if any(version is None for _, version in held) else False


def _version(parameter: nn.Parameter) -> int | None:
    return None if parameter.is_inference() else parameter._version


def note_stop(model: nn.Module, before: ParameterVersions, report: PruningReport) -> str:
    """What the error of a stopped step adds: whether the model changed, how far the step got; a changed model is
    marked so that ``check_not_stopped`` refuses it."""
    if before.changed(model) is False:
        return "prune() stopped before changing any weight: the model is as it was"
    done = sorted({(row.part, row.layer_index) for row in report.linears})
    progress = ""
    if done:
        parts = {part for part, _ in done}
        layers = ", ".join(f"{part} {index}" if len(parts) > 1 else str(index) for part, index in done)
        progress = f" (layers it changed: {layers})"
    note = (
        f"prune() stopped while changing the model{progress}: its weights {'are' if done else 'may be'} partly pruned "
        "and this step is not recorded in its config. Load the model again before using, saving or pruning it"
    )
    setattr(model, _STOPPED, note)
    return note


def check_not_stopped(model: nn.Module, action: str) -> None:
    """Refuse to ``action`` a model a pruning step stopped part-way through (its checkpoint would not reload as it
    is, and another step would build on a model no config describes)."""
    for module in model.modules():  # the model inside a wrapper (peft's, a Trainer's) too
        note = getattr(module, _STOPPED, None)
        if note is not None:
            raise ValueError(f"cannot {action}: {note}")
