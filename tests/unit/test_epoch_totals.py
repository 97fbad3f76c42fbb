"""An epoch's totals are summed as tensors (no host sync per step) and read once, to the same numbers as the
Python floats they replace."""

from __future__ import annotations

import torch
from trainer_service.engine.epoch import EpochTotals


def test_tensor_sums_read_once_equal_python_float_sums() -> None:
    g = torch.Generator().manual_seed(3)
    totals = EpochTotals()
    loss_sum, correct, seen = 0.0, 0, 0
    for n in (32, 32, 7):  # the last batch is short
        loss = torch.rand((), generator=g) * 3
        logits = torch.randn(n, 5, generator=g)
        targets = torch.randint(0, 5, (n,), generator=g)
        totals.add(loss, logits, targets)
        loss_sum += float(loss) * n  # what the totals did per step before
        correct += int((logits.argmax(1) == targets).sum())
        seen += n
    assert isinstance(totals._loss, torch.Tensor)  # still a tensor: nothing was read back yet
    assert (totals.loss, totals.correct, totals.seen) == (loss_sum, correct, seen)
    assert totals.mean_loss == loss_sum / seen
    assert totals.accuracy == correct / seen
    assert (EpochTotals().mean_loss, EpochTotals().accuracy) == (0.0, 0.0)
