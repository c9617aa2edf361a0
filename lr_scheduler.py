"""The learning-rate schedule, counted in optimizer steps (``scheduler.step_update(n)``).

The schedules are those of the official code, built the same way: ``cosine`` and ``step`` on
timm's schedulers, ``linear`` on the authors' ``LinearLRScheduler`` (below). With
``total`` = TRAIN.EPOCHS and ``warmup`` = TRAIN.WARMUP_EPOCHS times ``n_iter_per_epoch``, the rate
at step ``t`` is, during the warm-up (``t < warmup``), the straight line from TRAIN.WARMUP_LR at
step 0 towards TRAIN.BASE_LR at step ``warmup``; after it:

* ``cosine``: ``MIN_LR + (BASE_LR - MIN_LR) * (1 + cos(pi * t / total)) / 2``. The cosine spans all
  steps counted from 0 and the warm-up only replaces its start, so the run ends just above MIN_LR;
* ``linear``: from BASE_LR at step ``warmup`` down to ``BASE_LR / 100`` at step ``total``, whatever
  TRAIN.MIN_LR says;
* ``step``: ``BASE_LR * DECAY_RATE ** (t // (DECAY_EPOCHS * n_iter_per_epoch))``, counted from the
  start of training (warm-up included).
"""
from __future__ import annotations

import logging

import torch
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler

from config import UserError

SCHEDULER_NAMES = ("cosine", "linear", "step")
LINEAR_END_FRACTION = 0.01  # the official linear schedule ends at 1% of BASE_LR

_logger = logging.getLogger(f"crossformer.{__name__}")  # reaches the run log


def build_scheduler(config, optimizer: torch.optim.Optimizer, n_iter_per_epoch: int) -> Scheduler:
    """The schedule named by TRAIN.LR_SCHEDULER.NAME; ``n_iter_per_epoch`` is in optimizer steps."""
    if n_iter_per_epoch < 1:
        raise ValueError(f"n_iter_per_epoch must be at least 1, got {n_iter_per_epoch}")
    train = config.TRAIN
    total_steps = int(train.EPOCHS * n_iter_per_epoch)
    warmup_steps = int(train.WARMUP_EPOCHS * n_iter_per_epoch)
    if warmup_steps >= total_steps:
        _logger.warning("TRAIN.WARMUP_EPOCHS (%s) is not below TRAIN.EPOCHS (%s): the learning "
                        "rate never reaches TRAIN.BASE_LR", train.WARMUP_EPOCHS, train.EPOCHS)
    name = train.LR_SCHEDULER.NAME.lower()
    if name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(1, total_steps), lr_min=train.MIN_LR,
                                 warmup_lr_init=train.WARMUP_LR, warmup_t=warmup_steps,
                                 warmup_prefix=False, cycle_limit=1, t_in_epochs=False)
    if name == "linear":
        return LinearLRScheduler(optimizer, t_initial=max(1, total_steps), lr_min_rate=LINEAR_END_FRACTION,
                                 warmup_lr_init=train.WARMUP_LR, warmup_t=warmup_steps, t_in_epochs=False)
    if name == "step":
        if train.LR_SCHEDULER.DECAY_EPOCHS <= 0:
            raise UserError("TRAIN.LR_SCHEDULER.DECAY_EPOCHS must be positive for the step "
                            f"schedule, got {train.LR_SCHEDULER.DECAY_EPOCHS}")
        # warmup_prefix=False: the timm the authors pinned (0.3.2) counted the decay from step 0;
        # newer timm defaults to counting it after the warm-up.
        return StepLRScheduler(optimizer,
                               decay_t=int(train.LR_SCHEDULER.DECAY_EPOCHS * n_iter_per_epoch),
                               decay_rate=train.LR_SCHEDULER.DECAY_RATE,
                               warmup_lr_init=train.WARMUP_LR, warmup_t=warmup_steps,
                               warmup_prefix=False, t_in_epochs=False)
    raise UserError(f"TRAIN.LR_SCHEDULER.NAME: unknown schedule {train.LR_SCHEDULER.NAME!r}; "
                    f"known: {', '.join(SCHEDULER_NAMES)}")


class LinearLRScheduler(Scheduler):
    """The official linear schedule (the authors' class and arguments). Each parameter group's
    rate goes in a straight line from ``warmup_lr_init`` at step 0 to its base rate at step
    ``warmup_t``, then in a straight line down to ``lr_min_rate`` times its base rate at step
    ``t_initial``, where it stays (the official class kept going down, below zero). Steps are
    epochs with ``t_in_epochs``, else optimizer updates (``step_update``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, t_initial: int, lr_min_rate: float, warmup_t: int = 0,
                 warmup_lr_init: float = 0., t_in_epochs: bool = True, noise_range_t=None, noise_pct: float = 0.67,
                 noise_std: float = 1.0, noise_seed: int = 42, initialize: bool = True) -> None:
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=t_in_epochs, noise_range_t=noise_range_t,
                         noise_pct=noise_pct, noise_std=noise_std, noise_seed=noise_seed, initialize=initialize)
        self.t_initial = t_initial
        self.lr_min_rate = lr_min_rate
        self.warmup_t = warmup_t
        self.warmup_lr_init = warmup_lr_init
        if warmup_t:
            self.update_groups(warmup_lr_init)

    def _get_lr(self, t: int) -> list[float]:
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * (base - self.warmup_lr_init) / self.warmup_t for base in self.base_values]
        progress = min(1.0, (t - self.warmup_t) / max(1, self.t_initial - self.warmup_t))
        return [base - (base - base * self.lr_min_rate) * progress for base in self.base_values]
