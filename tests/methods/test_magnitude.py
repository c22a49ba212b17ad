import torch

from optimum_prune import PruningConfig, prune, verify_sparsity

from ..conftest import tiny_model


def test_magnitude_needs_no_calibration_and_prunes_smallest():
    model = tiny_model()
    dense = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    report = prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    assert report.calibration_tokens == 0
    pruned = model.model.layers[1].mlp.down_proj.weight.detach()
    kept = pruned != 0
    assert int((~kept).sum()) == dense.numel() // 2
    assert dense.abs()[~kept].max() <= dense.abs()[kept].min()
    torch.testing.assert_close(pruned[kept], dense[kept], rtol=0, atol=0)


def test_magnitude_nm():
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    result = verify_sparsity(model, "2:4")
    assert result["conforming"] and result["overall_sparsity"] == 0.5
