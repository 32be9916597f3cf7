"""`p3o.core`, the pieces every training stage shares: AdamW's groups, the schedule, the non-finite
guard, the micro-batch step and the checkpoint's training state. The stages' own tests run them in
place (tests/test_supervised.py, tests/test_engine.py, tests/test_checkpoint.py); these pin the pieces."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from p3o.core.checkpoint import RESUMABLE_RUN_SETTINGS, load_training_checkpoint, save_training_checkpoint
from p3o.core.optimizer import adamw, lr_scheduler, param_groups
from p3o.core.skips import NonFiniteTraining, count_skip
from p3o.core.step import accumulate_and_step
from p3o.errors import UsageError


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
    model[2].bias.requires_grad_(False)  # frozen, as LoRA's base: never handed to the optimiser
    return model


def test_weight_decay_falls_on_trainable_matrices_only():
    model = small_model()
    decayed, plain = param_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in plain["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    optimizer = adamw(model, 1e-3, 0.1, betas=(0.9, 0.95), eps=1e-6)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-6


def test_warmup_steps_win_over_the_ratio_and_a_bad_schedule_name_is_one_line():
    def lrs(**warmup):
        optimizer = adamw(small_model(), 1.0, 0.0)
        scheduler = lr_scheduler("linear", optimizer, 10, **warmup)
        values = []
        for _ in range(4):
            values.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return values

    assert lrs(warmup_steps=2, warmup_ratio=0.4) == pytest.approx([0.0, 0.5, 1.0, 7 / 8])
    assert lrs(warmup_ratio=0.4) == pytest.approx([0.0, 0.25, 0.5, 0.75])  # ceil(0.4 * 10) = 4 steps
    with pytest.raises(UsageError, match="--lr_scheduler_type 'no-such'"):
        lr_scheduler("no-such", adamw(small_model(), 1.0, 0.0), 10)


@dataclass
class Counters:
    skipped_updates: int = 0
    consecutive_skips: int = 0


def test_the_skip_guard_counts_resets_and_stops_at_the_limit():
    state = Counters()
    for stepped in (False, False, True, False, False):
        count_skip(state, stepped, max_consecutive_skips=3, step=1)
    assert (state.skipped_updates, state.consecutive_skips) == (4, 2)
    with pytest.raises(NonFiniteTraining, match=r"3 optimiser steps in a row had a non-finite loss or gradient \(step 7\)"):
        count_skip(state, False, max_consecutive_skips=3, step=7)
    assert issubclass(NonFiniteTraining, UsageError)  # the CLI prints it in one line, exit 2


def test_accumulated_micro_batches_step_as_one_batch_and_a_nan_step_is_dropped():
    from accelerate import Accelerator

    x, y = torch.randn(6, 3, generator=torch.Generator().manual_seed(1)), torch.randn(6, 1)

    def run(parts, poison=False):
        model = small_model()
        optimizer = adamw(model, 1e-2, 0.0)
        scheduler = lr_scheduler("constant", optimizer, 1)

        def part_loss(rows):  # the sum over the part, divided by the whole step's 6 rows
            loss = ((model(x[rows]) - y[rows]) ** 2).sum() / 6
            return loss * float("nan") if poison else loss, len(rows)

        step = accumulate_and_step(Accelerator(cpu=True), model, optimizer, scheduler, parts, part_loss, 1.0)
        return step, [p.detach().clone() for p in model.parameters()]

    (one, whole), (three, accumulated) = run([list(range(6))]), run([[0, 1], [2, 3], [4, 5]])
    assert one.stepped and three.stepped and three.extras == [2, 2, 2]
    assert three.loss == pytest.approx(one.loss) and three.grad_norm == pytest.approx(one.grad_norm)
    for a, b in zip(whole, accumulated):
        torch.testing.assert_close(a, b)
    skipped, untouched = run([[0, 1, 2], [3, 4, 5]], poison=True)
    assert not skipped.stepped
    assert all(torch.equal(a, b) for a, b in zip(untouched, [p.detach() for p in small_model().parameters()]))


def test_a_checkpoint_holds_optimiser_schedule_rng_and_state(tmp_path):
    from accelerate import Accelerator

    acc, model = Accelerator(cpu=True), small_model()
    optimizer = adamw(model, 1e-2, 0.0)
    scheduler = lr_scheduler("linear", optimizer, 10, warmup_steps=2)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    torch.manual_seed(5)
    path = save_training_checkpoint(tmp_path, 1, {"step": 1}, acc, model, optimizer, scheduler,
                                    lambda d: (d / "weights").write_text("w"), limit=None)
    assert path.name == "checkpoint-1"
    assert sorted(f.name for f in path.iterdir()) == ["optimizer.pt", "rng.pt", "scheduler.pt", "trainer_state.json",
                                                      "weights"]
    expected = torch.rand(3)
    fresh = adamw(model, 1e-2, 0.0)
    fresh_schedule = lr_scheduler("linear", fresh, 10, warmup_steps=2)
    assert load_training_checkpoint(path, acc, model, fresh, fresh_schedule) == {"step": 1}
    assert torch.equal(torch.rand(3), expected)  # the RNG as it was saved
    assert fresh_schedule.get_last_lr() == scheduler.get_last_lr()
    assert fresh.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert {"output_dir", "resume", "save_steps", "max_consecutive_skips"} <= RESUMABLE_RUN_SETTINGS


def test_one_process_may_run_stages_in_different_mixed_precisions():
    """The instruct demo and `p3o pipeline` run several stages in one process, each with its own
    --mixed_precision; accelerate alone refuses the second ("restart your runtime")."""
    from accelerate.state import AcceleratorState

    from p3o.utils.distributed import make_accelerator

    AcceleratorState._reset_state()
    try:
        assert make_accelerator(mixed_precision="bf16").mixed_precision == "bf16"
        assert make_accelerator(mixed_precision="no").mixed_precision == "no"
        assert make_accelerator(mixed_precision="bf16").mixed_precision == "bf16"
    finally:
        AcceleratorState._reset_state()
