"""The learning-rate schedule, counted in optimizer steps (``scheduler.step_update(n)``).

The schedules are those of the official code, built the same way on timm's schedulers. With
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

from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch.optim import Optimizer

from config import UserError

SCHEDULER_NAMES = ("cosine", "linear", "step")
LINEAR_END_FRACTION = 0.01  # the official linear schedule ends at 1% of BASE_LR

_logger = logging.getLogger(f"crossformer.{__name__}")  # reaches the run log


def build_scheduler(config, optimizer: Optimizer, n_iter_per_epoch: int) -> Scheduler:
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
        # timm's polynomial decay of power 1 over the steps after the warm-up is the official
        # straight line; every parameter group starts from BASE_LR, so one absolute end rate fits all.
        return PolyLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps), power=1.0,
                               lr_min=train.BASE_LR * LINEAR_END_FRACTION, warmup_lr_init=train.WARMUP_LR,
                               warmup_t=warmup_steps, warmup_prefix=True, cycle_limit=1, t_in_epochs=False)
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
