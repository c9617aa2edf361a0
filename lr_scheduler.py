"""The learning-rate schedule, counted in optimizer steps (``scheduler.step_update(n)``).

Every schedule warms up linearly from TRAIN.WARMUP_LR at update 0 to TRAIN.BASE_LR at update
``warmup`` (= TRAIN.WARMUP_EPOCHS * n_iter_per_epoch). After that:

* ``cosine``: cosine decay reaching TRAIN.MIN_LR exactly at the last update of the run,
  ``total - 1`` (total = TRAIN.EPOCHS * n_iter_per_epoch), and staying there;
* ``linear``: the same, along a straight line;
* ``step``: BASE_LR times TRAIN.LR_SCHEDULER.DECAY_RATE for every TRAIN.LR_SCHEDULER.DECAY_EPOCHS
  counted from the start of training (warm-up included).
"""
from __future__ import annotations

import logging

from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch.optim import Optimizer

from config import UserError

SCHEDULER_NAMES = ("cosine", "linear", "step")

_logger = logging.getLogger(f"crossformer.{__name__}")  # reaches the run log


def build_scheduler(config, optimizer: Optimizer, n_iter_per_epoch: int) -> Scheduler:
    """The schedule named by TRAIN.LR_SCHEDULER.NAME; ``n_iter_per_epoch`` is in optimizer steps."""
    if n_iter_per_epoch < 1:
        raise ValueError(f"n_iter_per_epoch must be at least 1, got {n_iter_per_epoch}")
    train = config.TRAIN
    total_steps = train.EPOCHS * n_iter_per_epoch
    warmup_steps = train.WARMUP_EPOCHS * n_iter_per_epoch
    if warmup_steps >= total_steps:
        _logger.warning("TRAIN.WARMUP_EPOCHS (%s) is not below TRAIN.EPOCHS (%s): the learning "
                        "rate never reaches TRAIN.BASE_LR", train.WARMUP_EPOCHS, train.EPOCHS)
    # With warmup_prefix, timm decays over the t_initial updates that follow the warm-up,
    # so MIN_LR is reached at update warmup + decay_steps = total - 1.
    decay_steps = max(1, total_steps - warmup_steps - 1)
    name = train.LR_SCHEDULER.NAME.lower()
    if name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=decay_steps, lr_min=train.MIN_LR,
                                 warmup_lr_init=train.WARMUP_LR, warmup_t=warmup_steps,
                                 warmup_prefix=True, cycle_limit=1, t_in_epochs=False)
    if name == "linear":
        return PolyLRScheduler(optimizer, t_initial=decay_steps, power=1.0, lr_min=train.MIN_LR,
                               warmup_lr_init=train.WARMUP_LR, warmup_t=warmup_steps,
                               warmup_prefix=True, cycle_limit=1, t_in_epochs=False)
    if name == "step":
        if train.LR_SCHEDULER.DECAY_EPOCHS <= 0:
            raise UserError("TRAIN.LR_SCHEDULER.DECAY_EPOCHS must be positive for the step "
                            f"schedule, got {train.LR_SCHEDULER.DECAY_EPOCHS}")
        return StepLRScheduler(optimizer,
                               decay_t=train.LR_SCHEDULER.DECAY_EPOCHS * n_iter_per_epoch,
                               decay_rate=train.LR_SCHEDULER.DECAY_RATE,
                               warmup_lr_init=train.WARMUP_LR, warmup_t=warmup_steps,
                               warmup_prefix=False, t_in_epochs=False)
    raise UserError(f"TRAIN.LR_SCHEDULER.NAME: unknown schedule {train.LR_SCHEDULER.NAME!r}; "
                    f"known: {', '.join(SCHEDULER_NAMES)}")
