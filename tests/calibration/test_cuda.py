"""The engine on CUDA gives the CPU result (skipped without a GPU)."""

import pytest
import torch

from optimum_prune import PruningConfig, prune, verify_sparsity

from ..conftest import decoder_linear_parameters, tiny_model, token_windows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("method,sparsity", [("wanda", 0.5), ("sparsegpt", "2:4")])
def test_cuda_layers_match_cpu_and_model_stays_home(method, sparsity):
    config = PruningConfig(method=method, sparsity=sparsity)
    cpu_model, offloaded = tiny_model(), tiny_model()
    prune(cpu_model, config, calibration=token_windows())
    report = prune(offloaded, config, calibration=token_windows(), device="cuda")
    assert report.device.startswith("cuda") and report.peak_memory_kind == "CUDA allocated"
    assert {p.device.type for p in offloaded.parameters()} == {"cpu"}  # processed on GPU, moved back
    # GPU and CPU sums differ in the last bits, which may flip a near-tied weight: compare masks, not bits.
    cpu_masks = torch.cat([(p == 0).flatten() for p in cpu_model.parameters()])
    gpu_masks = torch.cat([(p == 0).flatten() for p in offloaded.parameters()])
    assert cpu_masks.sum() == gpu_masks.sum()
    assert (cpu_masks == gpu_masks).float().mean() > 0.995


def test_model_already_on_cuda():
    model = tiny_model().cuda()
    prune(model, PruningConfig(method="wanda", sparsity="2:4"), calibration=token_windows())
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert verify_sparsity(model, "2:4")["conforming"]


def test_activations_offloaded_to_the_cpu_give_the_same_masks_with_less_gpu_memory():
    """Pruning on the GPU with the calibration activations on the CPU: same result, only a batch on the GPU."""
    config = PruningConfig(method="sparsegpt", sparsity=0.5, num_calibration_samples=64, calibration_seq_len=128)
    windows = token_windows(samples=64, seq_len=128)
    resident, offloaded = tiny_model(hidden_size=512, intermediate_size=1024), tiny_model(hidden_size=512, intermediate_size=1024)
    kept = prune(resident, config, calibration=windows, device="cuda")
    moved = prune(offloaded, config, calibration=windows, device="cuda", activation_device="cpu")
    for a, b in zip(resident.parameters(), offloaded.parameters()):
        assert torch.equal(a == 0, b == 0)
    activations = 2 * 64 * 128 * 512 * 4  # both buffers, fp32
    assert moved.peak_memory_bytes < kept.peak_memory_bytes - activations // 2


@pytest.mark.parametrize("options", [{"rearrange": False}, {}])
def test_mask_search_on_a_model_on_cuda(options):
    """Fisher blocks live with the model: unit indices from a GPU block indexed the CPU scores."""
    model = tiny_model().cuda()
    before = decoder_linear_parameters(model)
    prune(model, PruningConfig(method="mask_search", sparsity=0.3, method_options=options), calibration=token_windows())
    assert 1 - decoder_linear_parameters(model) / before == pytest.approx(0.3, abs=0.03)


@pytest.mark.parametrize("method,sparsity", [("llm_surgeon", 0.5), ("llm_surgeon_structured", 0.3)])
def test_llm_surgeon_factors_on_the_cpu_beside_a_model_on_cuda(method, sparsity):
    """The factors, their inverses and the updates on the host; the weights written back where they live."""
    model = tiny_model().cuda()
    before = decoder_linear_parameters(model)
    config = PruningConfig(method=method, sparsity=sparsity, method_options={"shots": 1, "factors_on_cpu": True})
    prune(model, config, calibration=token_windows())
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    if method == "llm_surgeon":
        assert verify_sparsity(model)["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    else:
        assert 1 - decoder_linear_parameters(model) / before == pytest.approx(0.3, abs=0.03)


def test_mask_rearrangement_of_a_fisher_block_on_cuda():
    """mask_search moves the Fisher blocks to the model's device; the swap's coupling matvec took a CPU mask."""
    from optimum_prune.methods.mask_search import rearranged

    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fisher = x.T @ x
    assert torch.equal(rearranged(fisher.cuda(), 10).cpu(), rearranged(fisher, 10))
