import numpy as np
import pytest

from optimum_prune import DistillationConfig, PERPConfig
from optimum_prune.expert_dropping import ExpertDroppingSchedule


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: PERPConfig(rank=8.0), "PERPConfig.rank must be int, got 8.0"),
        (lambda: PERPConfig(rank="8"), "PERPConfig.rank must be int, got '8'"),
        (lambda: PERPConfig(biases="yes"), "PERPConfig.biases must be bool, got 'yes'"),
        (lambda: ExpertDroppingSchedule(final_experts=2.0), "ExpertDroppingSchedule.final_experts must be int, got 2.0"),
        (lambda: DistillationConfig(top_k=True), "DistillationConfig.top_k must be int, got True"),
    ],
)
def test_a_training_config_field_of_another_type_is_named_when_built(build, message):
    """``PERPConfig(rank=8.0)`` was taken and built float-rank adapters; ``rank="8"`` failed on a comparison."""
    with pytest.raises(TypeError, match=message):
        build()


def test_training_config_numbers_are_read_as_their_fields_types():
    assert PERPConfig(rank=np.int64(4), alpha=16).alpha == 16.0 and type(PERPConfig(rank=np.int64(4)).rank) is int
    assert type(DistillationConfig(temperature=2).temperature) is float
    assert ExpertDroppingSchedule(final_experts=np.int32(2), end_step=None).end_step is None
