"""The training loop's guard against non-finite gradients: an unlucky batch is skipped, divergence is an error,
and non-finite weights are never returned for saving; the log's learning rate is the one each step used."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ssb.errors import SsbError
from ssb.train import TrainSpec, train


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))


def _spec(steps: int) -> TrainSpec:
    return TrainSpec(n_examples=8, batch_size=2, epochs=1, max_steps=steps, lr=0.1, weight_decay=0.0,
                     warmup_steps=0, schedule="constant", max_grad_norm=1.0, save_every=0, seed=0)


def _run(tmp_path, bad_steps: set[int], steps: int = 6):
    model, seen = Toy(), []

    def step_loss(idx):
        seen.append(model.w.detach().clone())
        scale = float("nan") if len(seen) in bad_steps else 1.0
        return (model.w * scale).pow(2).sum() * len(idx), len(idx)

    result = train(model, _spec(steps), tmp_path, step_loss, lambda idx: float(len(idx)))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    return model, seen, result, log


def test_a_non_finite_step_is_skipped_and_logged(tmp_path):
    model, seen, result, log = _run(tmp_path, bad_steps={3})
    assert result["skipped_steps"] == [3] and result["steps"] == 6
    assert torch.equal(seen[3], seen[2])  # step 3 did not move the weights
    assert not torch.equal(seen[2], seen[1]) and not torch.equal(seen[4], seen[3])
    assert torch.isfinite(model.w).all()
    assert [r.get("skipped", False) for r in log] == [False, False, True, False, False, False]


def test_skipped_steps_before_a_checkpoint_survive_a_resume(tmp_path):
    """Killed after the step-4 checkpoint, resumed: the step skipped before it is still counted (in the result, and
    by the divergence guard)."""
    spec = dataclasses.replace(_spec(6), save_every=2)

    def step_loss_for(model, die_at=None):
        calls = []

        def step_loss(idx):
            calls.append(1)
            if len(calls) == die_at:
                raise KeyboardInterrupt
            scale = float("nan") if len(calls) == 1 and die_at else 1.0  # the first run's step 1
            return (model.w * scale).pow(2).sum() * len(idx), len(idx)
        return step_loss

    model = Toy()
    with pytest.raises(KeyboardInterrupt):
        train(model, spec, tmp_path, step_loss_for(model, die_at=5), lambda idx: float(len(idx)))
    model = Toy()
    result = train(model, spec, tmp_path, step_loss_for(model), lambda idx: float(len(idx)))
    assert result["steps"] == 6 and result["skipped_steps"] == [1]


def test_many_non_finite_steps_are_divergence(tmp_path):
    with pytest.raises(SsbError, match="diverged"):
        _run(tmp_path, bad_steps={2, 3, 4, 5, 6}, steps=6)


def test_the_logged_lr_is_the_rate_each_step_updated_with(tmp_path):
    model = Toy()
    spec = dataclasses.replace(_spec(4), schedule="linear", max_grad_norm=0.0)
    seen = []

    def step_loss(idx):
        seen.append(model.w.detach().clone())
        return model.w.sum() * len(idx), len(idx)  # a constant gradient: Adam moves each weight by lr per step

    train(model, spec, tmp_path, step_loss, lambda idx: float(len(idx)))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == pytest.approx([0.1, 0.075, 0.05, 0.025])
    assert torch.allclose(seen[0] - seen[1], torch.full((3,), 0.1))  # step 1 moved by the full rate (Adam: lr x 1)
