"""Statistics gathered while a model runs: ShortGPT's Block Influence, the real (unpadded) tokens of a batch."""

import torch

from optimum_prune.statistics import BlockInfluence, mean_ranks
from optimum_prune.training_hooks import RealTokens

from .conftest import tiny_model, token_windows


def test_block_influence_averages_over_tokens_not_batches():
    influence = BlockInfluence()
    same = torch.ones(1, 1, 4)
    influence.add(same, same)  # one token, cosine 1
    influence.add(torch.ones(1, 3, 4), -torch.ones(1, 3, 4))  # three tokens, cosine -1
    assert abs(influence.value() - (1 - (1 - 3) / 4)) < 1e-12


def test_real_tokens_forget_an_earlier_batchs_padding():
    model = tiny_model()
    real_tokens = RealTokens(model)
    ids = token_windows(samples=2, seq_len=6)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.tensor([[1] * 6, [0, 0] + [1] * 4]))
        assert real_tokens.mask is not None
        model(input_ids=ids)  # no padding in this batch: every position counts
    values = torch.arange(12.0).reshape(2, 6, 1)
    assert torch.equal(real_tokens.of(values), values)
    real_tokens.handle.remove()


def test_equal_values_share_their_mean_rank():
    assert mean_ranks(torch.tensor([3.0, 1.0, 3.0, 0.0, 3.0])).tolist() == [3.0, 1.0, 3.0, 0.0, 3.0]
    assert mean_ranks(torch.tensor([[2.0, 2.0], [2.0, 2.0]])).tolist() == [1.5] * 4
    assert mean_ranks(torch.tensor([2, 1, 0])).tolist() == [2.0, 1.0, 0.0]


def test_one_tokens_variance_is_zero():
    """n = max(tokens, 2) made one token's variance x²/2: FLAP scored one-token calibration by activation²."""
    from optimum_prune.statistics import ColumnMoments

    moments = ColumnMoments(2, torch.device("cpu"))
    moments.add(torch.tensor([[[3.0, -4.0]]]))
    assert moments.variance().tolist() == [0.0, 0.0]
    moments.add(torch.tensor([[[1.0, -4.0]]]))
    assert moments.variance().tolist() == [2.0, 0.0]
