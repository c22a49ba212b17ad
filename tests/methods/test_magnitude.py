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


def test_output_comparison_group_prunes_each_row_alike():
    """comparison_group='output' (ignored by one cut over the matrix, no test failed): the smallest of each row."""
    model = tiny_model()
    dense = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5, method_options={"comparison_group": "output"}))
    kept = model.model.layers[1].mlp.down_proj.weight.detach() != 0
    assert kept.sum(dim=1).tolist() == [dense.shape[1] // 2] * dense.shape[0]
    for row in range(dense.shape[0]):
        assert dense[row].abs()[~kept[row]].max() <= dense[row].abs()[kept[row]].min()


def test_magnitude_nm():
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    result = verify_sparsity(model, "2:4")
    assert result["conforming"] and result["overall_sparsity"] == 0.5
