"""The loss contract of the training loop: `loss_func` returns the unnormalised sum of the masked
token losses and the token count, which is right only for a model built with
`calculate_per_token_loss` (mcore then divides by the global token count)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.training.loop import PER_TOKEN_LOSS, check_loss_contract, loss_func


def test_loss_func_returns_the_masked_sum_and_the_token_count():
    per_token = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    loss_sum, tokens, report = loss_func(mask, per_token)
    assert loss_sum.item() == 6.0 and tokens.item() == 2 and tokens.dtype == torch.int
    assert report["lm loss"].tolist() == [6.0, 2.0, 0.0]


def test_a_micro_batch_without_loss_tokens_is_counted_not_nan():
    per_token = torch.tensor([[1.0, 3.0, 4.0]])
    loss_sum, tokens, report = loss_func(torch.zeros(1, 3), per_token)
    assert loss_sum.item() == 0.0 and tokens.item() == 0
    assert report["lm loss"].tolist() == [0.0, 0.0, 1.0]  # counted as a micro-batch without loss tokens


def test_the_model_config_must_carry_the_per_token_contract():
    assert PER_TOKEN_LOSS is True
    check_loss_contract(SimpleNamespace(calculate_per_token_loss=True))
    with pytest.raises(AssertionError, match="calculate_per_token_loss=False; loop.loss_func returns per-token sums"):
        check_loss_contract(SimpleNamespace(calculate_per_token_loss=False))
    with pytest.raises(AssertionError, match="calculate_per_token_loss=None"):
        check_loss_contract(SimpleNamespace())
