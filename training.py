"""The run core: the training loop that classification (main.py), detection and segmentation
share. A trainer brings its model, its loss and its evaluation; everything else happens here,
the same way for all three:

- which checkpoint to continue from, what a checkpoint holds, what it is called, pruning;
- the best model (``best.pth``), metrics.jsonl (each record once, also after a resume),
  TensorBoard scalars, the closing summary and curves;
- stop signals (SIGTERM, SIGUSR1, SIGINT: finish the step, save, exit 0 with the resume line)
  and time-based step checkpoints (TRAIN.CHECKPOINT_MINUTES);
- bit-exact resume inside an epoch or at any iteration: the main process is seeded per batch
  from (SEED, epoch, batch, rank), samples per sample (data/resumable.py);
- the non-finite-loss stop, the progress line with an ETA that leaves out the warm-up.

How a trainer counts its training is the one difference, and it is a parameter: an
``EpochSchedule`` (classification, detection) or an ``IterationSchedule`` (segmentation).
"""
from __future__ import annotations

import atexit
import datetime
import inspect
import logging
import multiprocessing
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from yacs.config import CfgNode

from config import UserError
from logger import JsonLinesWriter, ScalarWriter, create_scalar_writer, read_metrics
from plot import write_curves
from runtime import NonFiniteLossError, Precision
from utils import (BEST_CHECKPOINT, EPOCH_CHECKPOINTS, ITERATION_CHECKPOINTS, CheckpointFamily, DistInfo, derive_seed,
                   load_checkpoint_file, load_weights, model_state, newest_loadable_checkpoint, prune_checkpoints,
                   remove_step_checkpoints, seed_everything, write_checkpoint)

WARMUP_STEPS = 2  # the first steps of a launch (loader start-up, first allocations) are left out of the ETA


# ----------------------------------------------------------------------------- stopping without losing work
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """SIGTERM, SIGUSR1 (SLURM's ``--signal``) and SIGINT (Ctrl-C) as a request to stop at the
    next step boundary, instead of dying in the middle of a step.

    After ``stop = StopSignals().install()`` these signals are only recorded. The training loop
    calls ``stop.requested()`` at every step boundary; the answer is agreed across ranks (a
    signal to any rank stops all of them at the same step), so the loop can save a checkpoint
    and return. Once a signal has arrived, later ones (a second Ctrl-C during the save) are
    noted on stderr and otherwise ignored until the process ends: they cannot interrupt the save.
    ``restore()`` puts the previous handlers back if no signal came.
    """

    def __init__(self) -> None:
        self.received = 0  # the first signal's number; 0: none yet
        self._previous: dict[int, object] = {}
        self._group = None

    def install(self) -> StopSignals:
        """Record the stop signals from now on (call on every rank: it creates a process group)."""
        if dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # the flag lives on the host: no device sync
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def restore(self) -> None:
        """The previous handlers again, unless a signal came (then later ones stay ignored)."""
        if not self.received:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)

    def _record(self, signum: int, frame) -> None:
        if self.received:
            # os.write, not print/logging: a handler may run while those hold their locks
            os.write(2, f"{signal.Signals(signum).name} ignored: already stopping\n".encode())
            return
        self.received = signum

    def requested(self) -> str:
        """The name of the signal that stops the run ('' when none), the same on every rank."""
        received = self.received
        if self._group is not None:
            flag = torch.tensor([received])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            received = int(flag.item())
        return signal.Signals(received).name if received else ""


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the stop signals, which a terminal (Ctrl-C)
    or a cluster scheduler also sends them, and keep serving batches until the main process has
    finished its step; it stops them when it is done (see ``_kill_leftover_workers``)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@atexit.register
def _kill_leftover_workers() -> None:
    """At exit, kill child processes that are still alive (DataLoader workers of a run that ended
    with an uncaught error). They ignore SIGTERM, which multiprocessing's own exit handler (it
    runs after this one) would send before waiting for them forever."""
    children = multiprocessing.active_children()
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kills as errors
    for child in children:
        child.kill()


class CheckpointClock:
    """Says when ``minutes`` of training have passed since the last checkpoint; never for 0."""

    def __init__(self, minutes: float) -> None:
        if minutes < 0:
            raise UserError(f"TRAIN.CHECKPOINT_MINUTES must be >= 0 (0 turns step checkpoints off), got {minutes}")
        self.seconds = minutes * 60
        self.reset()

    def reset(self) -> None:
        self.start = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.start >= self.seconds


class StepClock:
    """Durations of training steps for the progress line. The mean leaves out the first
    ``warmup`` steps of a launch (data-loader start-up, first allocations, lazy initialisation),
    so an ETA is not an extrapolation of the slow first step; during them it is None.
    ``pause()`` before work that is not a training step (evaluation, a checkpoint), so that its
    time does not count as a step's."""

    def __init__(self, warmup: int = WARMUP_STEPS, now: Callable[[], float] = time.monotonic) -> None:
        self.warmup, self.now = warmup, now
        self.steps, self.counted, self.seconds, self.last = 0, 0, 0.0, 0.0
        self.pause()

    def pause(self) -> None:
        self.since = self.now()

    def step(self) -> None:
        now = self.now()
        self.last, self.since = now - self.since, now
        self.steps += 1
        if self.steps > self.warmup:
            self.counted += 1
            self.seconds += self.last

    def mean(self) -> float | None:
        return self.seconds / self.counted if self.counted else None


def _duration(seconds: float | None) -> str:
    return "-:--:--" if seconds is None else str(datetime.timedelta(seconds=int(seconds)))


# ----------------------------------------------------------------------------- schedules: epochs or iterations
class EpochSchedule:
    """Training counted in epochs (classification, detection): TRAIN.EPOCHS epochs of
    ``steps_per_epoch`` batches (``accumulation`` batches per optimizer update), evaluated after
    each, ``ckpt_epoch_N.pth`` after every SAVE_FREQ-th and the last. ``done`` counts batches
    from the start of training. A step checkpoint counts batches of one rank, so it resumes only
    with the ``world_size`` and batch size that wrote it."""

    unit = "epoch"
    checkpoints = EPOCH_CHECKPOINTS

    def __init__(self, config: CfgNode, steps_per_epoch: int, world_size: int = 1, accumulation: int = 1) -> None:
        self.epochs, self.steps_per_epoch, self.accumulation = config.TRAIN.EPOCHS, steps_per_epoch, accumulation
        self.save_freq, self.print_freq = config.SAVE_FREQ, config.PRINT_FREQ
        self.total_steps = self.epochs * steps_per_epoch
        self.start = config.TRAIN.START_EPOCH * steps_per_epoch
        self.batches = (world_size, config.DATA.BATCH_SIZE)

    def record_due(self, done: int) -> bool:
        return done > 0 and done % self.steps_per_epoch == 0

    def checkpoint_due(self, done: int) -> bool:
        return self.record_due(done) and ((done // self.steps_per_epoch - 1) % self.save_freq == 0
                                          or done == self.total_steps)

    def period_start(self, index: int) -> int:
        """The first step of the record period (epoch) that step ``index`` is in."""
        return index - index % self.steps_per_epoch

    def period_end(self, index: int) -> int:
        return self.period_start(index) + self.steps_per_epoch

    def records_after(self, done: int) -> int:
        return self.epochs - done // self.steps_per_epoch

    def record_entries(self, done: int) -> dict:
        return {"epoch": done // self.steps_per_epoch - 1}

    def checkpoint_entries(self, done: int) -> dict:
        return self.record_entries(done)

    def checkpoint_name(self, done: int) -> str:
        return f"{self.checkpoints.prefix}{done // self.steps_per_epoch - 1}.pth"

    def _epoch_step(self, done: int, pending: bool) -> tuple[int, int]:
        epoch, step = divmod(done, self.steps_per_epoch)
        return (epoch - 1, self.steps_per_epoch) if pending else (epoch, step)

    def step_entries(self, done: int, pending: bool) -> dict:
        epoch, step = self._epoch_step(done, pending)
        return {"epoch": epoch, "step": step}

    def step_checkpoint_name(self, done: int, pending: bool) -> str:
        return self.checkpoints.step_name.format(*self._epoch_step(done, pending))

    def position(self, checkpoint: dict, path: str) -> tuple[int, bool]:
        """``(done, pending)`` of a checkpoint: pending, a step checkpoint at the end of an epoch
        that is not validated yet. An epoch checkpoint continues with the next epoch."""
        if "step" not in checkpoint:
            return (int(checkpoint["epoch"]) + 1) * self.steps_per_epoch, False
        epoch, step = int(checkpoint["epoch"]), int(checkpoint["step"])
        written_by = (checkpoint.get("world_size"), checkpoint.get("batch_size"))
        if step and written_by != self.batches:
            raise UserError(f"{path} is a step checkpoint of {written_by[0]} processes x batch {written_by[1]}; "
                            f"this run has {self.batches[0]} x {self.batches[1]}: relaunch with those, or --resume "
                            "an epoch checkpoint")
        return epoch * self.steps_per_epoch + step, step == self.steps_per_epoch

    def where(self, done: int, pending: bool = False) -> str:
        return "epoch {} step {}".format(*self._epoch_step(done, pending))

    def resuming(self, done: int, pending: bool) -> str:
        epoch, step = self._epoch_step(done, pending)
        if step:
            return f"resuming training inside epoch {epoch} at step {step} of {self.steps_per_epoch}"
        return f"resuming training at epoch {epoch}"

    def complete(self, path: str) -> str:
        return (f"the run is complete: all {self.epochs} epochs are trained ({path}), nothing to do; "
                f"to train longer, relaunch with --epochs N (N > {self.epochs})")

    def progress_due(self, index: int) -> bool:
        step = index % self.steps_per_epoch
        return step % self.print_freq == 0 or step == self.steps_per_epoch - 1

    def progress_label(self, index: int) -> str:
        epoch, step = divmod(index, self.steps_per_epoch)
        return f"Train: [{epoch}/{self.epochs}][{step}/{self.steps_per_epoch}]"

    def first_to_redo(self, done: int, pending: bool) -> int:
        """The first ``epoch`` a run resumed at ``done`` records again."""
        return done // self.steps_per_epoch - pending


class IterationSchedule:
    """Training counted in iterations (segmentation): SEG.MAX_ITERS optimizer steps, evaluated
    every SEG.EVAL_INTERVAL and at the end, ``ckpt_iter_N.pth`` every SEG.CHECKPOINT_INTERVAL and
    at the end. The data still comes in passes (epochs of the loader, ``steps_per_epoch``
    batches each), which only the sampler and the seeds see."""

    unit = "iteration"
    checkpoints = ITERATION_CHECKPOINTS
    accumulation = 1
    start = 0

    def __init__(self, config: CfgNode, steps_per_epoch: int) -> None:
        seg = config.SEG
        self.total_steps, self.steps_per_epoch = seg.MAX_ITERS, steps_per_epoch
        self.eval_interval, self.checkpoint_interval = seg.EVAL_INTERVAL, seg.CHECKPOINT_INTERVAL
        self.print_freq = config.PRINT_FREQ

    def record_due(self, done: int) -> bool:
        return done > 0 and (done % self.eval_interval == 0 or done == self.total_steps)

    def checkpoint_due(self, done: int) -> bool:
        return done > 0 and (done % self.checkpoint_interval == 0 or done == self.total_steps)

    def period_start(self, index: int) -> int:
        """The first step of the record period (evaluation interval) that step ``index`` is in."""
        return index - index % self.eval_interval

    def period_end(self, index: int) -> int:
        return min(self.period_start(index) + self.eval_interval, self.total_steps)

    def records_after(self, done: int) -> int:
        return -(-self.total_steps // self.eval_interval) - done // self.eval_interval

    def record_entries(self, done: int) -> dict:
        return {"iteration": done}

    def checkpoint_entries(self, done: int) -> dict:
        return {"iteration": done}

    def checkpoint_name(self, done: int) -> str:
        return f"{self.checkpoints.prefix}{done}.pth"

    def step_entries(self, done: int, pending: bool) -> dict:
        return {"iteration": done, "evaluation_pending": pending}

    def step_checkpoint_name(self, done: int, pending: bool) -> str:
        return self.checkpoints.step_name.format(done)

    def position(self, checkpoint: dict, path: str) -> tuple[int, bool]:
        """``(done, pending)``: pending, a step checkpoint saved before the evaluation due there."""
        return int(checkpoint["iteration"]), bool(checkpoint.get("evaluation_pending", False))

    def where(self, done: int, pending: bool = False) -> str:
        return f"iteration {done}"

    def resuming(self, done: int, pending: bool) -> str:
        return f"resuming training at iteration {done}"

    def complete(self, path: str) -> str:
        return (f"the run is complete: all {self.total_steps} iterations are trained ({path}), nothing to do; "
                f"to train longer, relaunch with --opts SEG.MAX_ITERS N (N > {self.total_steps})")

    def progress_due(self, index: int) -> bool:
        return (index + 1) % self.print_freq == 0 or index + 1 == self.total_steps

    def progress_label(self, index: int) -> str:
        return f"Iter [{index + 1}/{self.total_steps}]"

    def first_to_redo(self, done: int, pending: bool) -> int:
        """The first ``iteration`` a run resumed at ``done`` records again."""
        return done + 1 - pending


Schedule = EpochSchedule | IterationSchedule


# ----------------------------------------------------------------------------- the best model
@dataclass
class BestModel:
    """Which evaluation number makes the weights the best so far (saved as ``best.pth``):
    ``metric`` (a key of the evaluation record), kept in checkpoints as ``checkpoint_key`` and in
    metrics.jsonl as ``record_key``; ``running`` formats it for the log after each evaluation,
    ``describe`` a record for the closing summary."""

    metric: str
    checkpoint_key: str
    record_key: str
    running: str
    describe: Callable[[dict], str]
    value: float = 0.0

    def update(self, value: float) -> bool:
        """Take ``value`` into account; True when it beats the best so far (the first of equal ones wins)."""
        improved = value > self.value
        self.value = max(self.value, value)
        return improved


def best_summary(output_dir: str, best: BestModel, unit: str) -> str:
    """Which evaluation was best, its numbers, and where ``best.pth`` is (from metrics.jsonl)."""
    records = [r for r in read_metrics(output_dir) if best.metric in r and unit in r]
    if not records:
        return f"no {unit} was validated"
    record = max(records, key=lambda r: r[best.metric])  # the first of equal ones, as best.pth keeps it
    path = os.path.join(output_dir, BEST_CHECKPOINT)
    where = f"weights in {path}" if os.path.isfile(path) else "no best.pth (no evaluation scored above 0)"
    return f"best {best.describe(record)} at {unit} {record[unit]}, {where}"


# ----------------------------------------------------------------------------- pieces every trainer calls
def checkpoint_to_resume(config: CfgNode, logger: logging.Logger,
                         family: CheckpointFamily = EPOCH_CHECKPOINTS) -> tuple[str, dict] | None:
    """``(path, checkpoint)`` to continue from: with TRAIN.AUTO_RESUME (not in eval mode) the newest
    loadable training checkpoint of OUTPUT, which wins over MODEL.RESUME (a warning says so);
    else MODEL.RESUME, if set."""
    if config.TRAIN.AUTO_RESUME and not config.EVAL_MODE:
        found = newest_loadable_checkpoint(config.OUTPUT, logger, config.TRUST_CHECKPOINTS, family)
        if found:
            if config.MODEL.RESUME and config.MODEL.RESUME != found[0]:
                logger.warning(f"auto-resume: using {found[0]} (newer than --resume {config.MODEL.RESUME})")
            return found
    if config.MODEL.RESUME:
        return config.MODEL.RESUME, load_checkpoint_file(config.MODEL.RESUME, config.TRUST_CHECKPOINTS)
    return None


def load_run_weights(config: CfgNode, logger: logging.Logger, model: nn.Module, family: CheckpointFamily,
                     weights_key: str = "model") -> tuple[str, dict] | None:
    """Load the ``weights_key`` weights (``model``, or ``model_ema``) of the checkpoint to
    continue from or to evaluate (``checkpoint_to_resume``) into ``model``; returns it."""
    found = checkpoint_to_resume(config, logger, family)
    if found:
        path, checkpoint = found
        load_weights(model, model_state(checkpoint, path, weights_key), path)
        logger.info(f"loaded {'EMA ' if weights_key == 'model_ema' else ''}weights from {path}")
    return found


def load_backbone_weights(backbone: nn.Module, path: str, trust: bool = False) -> None:
    """ImageNet weights (a classification checkpoint of ours or an official release) into a
    detection or segmentation backbone; the classifier and the final norm, which they do not
    use, are left out."""
    state = model_state(load_checkpoint_file(path, trust), path)
    load_weights(backbone, {k: v for k, v in state.items() if not k.startswith(("head.", "norm."))}, path)


def distributed(model: nn.Module, device: torch.device, sync_buffers: bool = True) -> nn.Module:
    """``model`` in DistributedDataParallel over the process group. ``sync_buffers`` False: the
    buffers are not broadcast before each forward (the official classification setting), asked
    through ``forward_sync_buffers`` where this torch has it (``broadcast_buffers`` warns as
    deprecated since torch 2.13)."""
    option = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
              else "broadcast_buffers")
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **{option: sync_buffers})


def supervised_losses(model: nn.Module, criterion: nn.Module, device: torch.device,
                      mix: Callable | None = None) -> Callable[[tuple], dict[str, torch.Tensor]]:
    """``losses`` for ``TrainingRun``: ``criterion(model(inputs), targets)`` of an ``(inputs,
    targets)`` batch moved to ``device``; ``mix`` (e.g. timm's Mixup) transforms both first."""

    def losses(batch: tuple) -> dict[str, torch.Tensor]:
        inputs, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if mix is not None:
            inputs, targets = mix(inputs, targets)
        return {"loss": criterion(model(inputs), targets)}

    return losses


def optimizer_step(model: nn.Module, optimizer: Optimizer, precision: Precision, clip_grad: float) -> torch.Tensor:
    """One update after the (scaled) backward: unscale, clip to ``clip_grad`` (0: no clipping,
    the norm is still measured), step, update the scaler, zero the gradients. Returns the norm."""
    precision.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad if clip_grad > 0 else float("inf"))
    precision.scaler.step(optimizer)
    precision.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ----------------------------------------------------------------------------- the loop
class TrainingRun:
    """One training run of any trainer. The trainer builds the model (``model``: as trained, in
    DDP or not), optimizer, ``precision`` and ``schedule``, and gives ``set_learning_rate(n)``
    (the rate for the update after ``n`` updates), then calls ``restore()`` and ``fit()`` with
    its loader, its loss and its evaluation. ``lr_scheduler`` and ``ema`` (timm's ModelEmaV3,
    updated after every optimizer step) are saved in checkpoints, ``extras`` (e.g. class names)
    too.
    """

    def __init__(self, config: CfgNode, dist_info: DistInfo, logger: logging.Logger, schedule: Schedule,
                 model: nn.Module, optimizer: Optimizer, precision: Precision,
                 set_learning_rate: Callable[[int], None], best: BestModel | None = None, lr_scheduler=None,
                 ema=None, extras: dict | None = None) -> None:
        self.config, self.dist_info, self.logger, self.schedule = config, dist_info, logger, schedule
        self.model, self.optimizer, self.precision = model, optimizer, precision
        self.module = model.module if isinstance(model, DistributedDataParallel) else model
        self.set_learning_rate, self.best, self.lr_scheduler, self.ema = set_learning_rate, best, lr_scheduler, ema
        self.extras = extras or {}
        self.done, self.pending = schedule.start, False
        self.sums: dict[str, torch.Tensor] = {}
        device = dist_info.device
        self.bad_index = torch.full((), -1, device=device)  # the first step with a non-finite loss
        self.last_terms: dict[str, torch.Tensor] = {}
        self.grad_norm = torch.zeros((), device=device)
        self.step_clock = StepClock()
        self.evaluation_seconds = 0.0
        self.scalars: ScalarWriter | None = None

    # ------------------------------------------------------------------ resuming
    def restore(self) -> str:
        """Load the checkpoint to continue from (``checkpoint_to_resume``): its weights, and if it
        is a training checkpoint also the optimizer, scaler, EMA, best value, running sums and
        position; set the learning rate for there. Returns its path ('' for a fresh start)."""
        found = load_run_weights(self.config, self.logger, self.module, self.schedule.checkpoints)
        if found and "optimizer" in found[1]:
            self._load_training_state(found[1], found[0])
        self.set_learning_rate(self.done // self.schedule.accumulation)
        return found[0] if found else ""

    def _load_training_state(self, checkpoint: dict, path: str) -> None:
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.done, self.pending = self.schedule.position(checkpoint, path)
        if "scaler" in checkpoint:
            self.precision.scaler.load_state_dict(checkpoint["scaler"])
        if self.best is not None:
            self.best.value = checkpoint.get(self.best.checkpoint_key, 0.0)
        device = self.dist_info.device
        self.sums = {key: torch.tensor(value, device=device, dtype=torch.float64)
                     for key, value in checkpoint.get("epoch_sums", {}).items()}
        if self.ema is not None:
            if "model_ema" in checkpoint:
                load_weights(self.ema.module, checkpoint["model_ema"], path)
            else:
                self.ema.set(self.module)
                self.logger.warning(f"{path} holds no EMA weights: the EMA starts from the loaded weights")
        if not self.complete:
            self.logger.info(self.schedule.resuming(self.done, self.pending))

    @property
    def complete(self) -> bool:
        """All training is done (nothing pending at the end)."""
        return self.done >= self.schedule.total_steps and not self.pending

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, entries: dict) -> dict:
        """The training state (model unwrapped from DDP) with the position ``entries``."""
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        state.update(scaler=self.precision.scaler.state_dict(), **entries)
        if self.best is not None:
            state[self.best.checkpoint_key] = self.best.value
        state["config"] = self.config.dump()
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        return {**state, **self.extras}

    def _save_step_checkpoint(self, pending: bool) -> str:
        """Rank 0 saves the state at this step boundary (never one with a non-finite loss) and
        deletes the older step checkpoint."""
        self._check_finite()
        family, schedule = self.schedule.checkpoints, self.schedule
        path = os.path.join(self.config.OUTPUT, schedule.step_checkpoint_name(self.done, pending))
        if self.dist_info.is_main:
            sums = {key: value.item() for key, value in self.sums.items()}
            write_checkpoint(self.checkpoint({**schedule.step_entries(self.done, pending), "epoch_sums": sums,
                                              "world_size": self.dist_info.world_size,
                                              "batch_size": self.config.DATA.BATCH_SIZE}), path)
            remove_step_checkpoints(self.config.OUTPUT, keep=path, family=family)
            self.logger.info(f"{path} saved")
        self.clock.reset()
        return path

    # ------------------------------------------------------------------ one epoch (or pass) of steps
    def train_steps(self, batches: Iterable, losses: Callable[[object], dict[str, torch.Tensor]], epoch: int,
                    start_step: int = 0, after_update: Callable[[], bool] | None = None) -> bool:
        """Train on ``batches``, which start at step ``start_step`` of ``epoch``, up to the end of
        the epoch (or of training). Before each batch the main process is seeded from (SEED,
        epoch, step, rank), so a resumed epoch draws what the uninterrupted one drew; then
        ``losses(batch)`` (under autocast; ``loss`` is the total) is back-propagated, and after
        every ``accumulation`` batches the optimizer steps, the learning rate follows the update
        count, the EMA follows and ``after_update()`` runs (True: stop). Every case (AMP or not,
        accumulation or not, DDP or not) takes the same path. Losses stay on the device; the
        host reads them only for the progress line. Returns whether ``after_update`` stopped."""
        schedule, config, precision = self.schedule, self.config, self.precision
        accumulation = schedule.accumulation
        ddp = isinstance(self.model, DistributedDataParallel)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        for step, batch in enumerate(batches, start=start_step):
            index = epoch * schedule.steps_per_epoch + step
            if step >= schedule.steps_per_epoch or index >= schedule.total_steps:
                break
            seed_everything(derive_seed(config.SEED, epoch, step, self.dist_info.rank))
            update = (step + 1) % accumulation == 0
            with self.model.no_sync() if ddp and not update else nullcontext():
                with precision.autocast():
                    terms = losses(batch)
                precision.scaler.scale(terms["loss"] / accumulation).backward()
            self._add_losses(terms, index)
            if update:
                self.grad_norm = optimizer_step(self.model, self.optimizer, precision, config.TRAIN.CLIP_GRAD)
                self.sums["grad_norm_sum"] = self.sums.get("grad_norm_sum", 0.0) + self.grad_norm.double()
                updates = (index + 1) // accumulation
                self.set_learning_rate(updates)
                if self.ema is not None:
                    self.ema.update(self.module, step=updates)
            self.done = index + 1
            self.step_clock.step()
            if schedule.progress_due(index):
                self._log_progress(index)
            if update and after_update is not None and after_update():
                return True
        self._check_finite()
        return False

    def _add_losses(self, terms: dict[str, torch.Tensor], index: int) -> None:
        self.last_terms = {name: value.detach().float() for name, value in terms.items()}
        for name, value in self.last_terms.items():
            self.sums[f"{name}_sum"] = self.sums.get(f"{name}_sum", 0.0) + value.double()
        self.bad_index = torch.where((self.bad_index < 0) & ~torch.isfinite(self.last_terms["loss"]), index,
                                     self.bad_index)

    def _check_finite(self) -> None:
        """Stop at the first step whose loss was not finite (before anything is saved)."""
        index = int(self.bad_index.item())
        if index >= 0:
            raise NonFiniteLossError(f"loss is not finite at {self.schedule.where(index)}; stopping without saving "
                                     "(the last checkpoint is kept)")

    def _averages(self, index: int) -> dict[str, float]:
        """Mean of every loss term and of the grad norm since the last record, through step ``index``."""
        steps = index + 1 - self.schedule.period_start(index)
        updates = max(1, steps // self.schedule.accumulation)
        return {key[:-4]: value.item() / (updates if key == "grad_norm_sum" else steps) for key, value in self.sums.items()}

    def _log_progress(self, index: int) -> None:
        """The progress line: position, ETA of the period (epoch, evaluation interval) and of the
        run (later evaluations included once one was timed), learning rate, step time, losses
        (last and mean), grad norm (last and mean), peak memory on CUDA. Loss, learning rate and
        grad norm also go to TensorBoard."""
        self._check_finite()
        schedule, clock = self.schedule, self.step_clock
        mean = clock.mean()
        period_left = schedule.period_end(index) - index - 1
        run_left = schedule.total_steps - index - 1
        evaluations = schedule.records_after(index + 1) * self.evaluation_seconds
        eta = (_duration(None if mean is None else mean * period_left) + " (run "
               + _duration(None if mean is None else mean * run_left + evaluations) + ")")
        averages = self._averages(index)
        lr = self.optimizer.param_groups[0]["lr"]
        last = {name: value.item() for name, value in self.last_terms.items()}
        grad_norm = self.grad_norm.item()
        losses = "\t".join([f"loss {last['loss']:.4f} ({averages['loss']:.4f})"]
                           + [f"{name} {last[name]:.4f} ({averages[name]:.4f})" for name in last if name != "loss"])
        device = self.dist_info.device
        memory = f"\tmem {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f}MB" if device.type == "cuda" else ""
        self.logger.info(f"{schedule.progress_label(index)}\teta {eta} lr {lr:.4e}\t"
                         f"time {clock.last:.4f} ({mean or clock.last:.4f})\t{losses}\t"
                         f"grad_norm {grad_norm:.4f} ({averages.get('grad_norm', 0.0):.4f}){memory}")
        if self.scalars is not None:
            for name, value in (*last.items(), ("lr", lr), ("grad_norm", grad_norm)):
                self.scalars.add_scalar(f"train/{name}", value, index)

    # ------------------------------------------------------------------ the whole run
    def fit(self, loader, losses: Callable[[object], dict[str, torch.Tensor]],
            evaluate: Callable[[], dict[str, float]]) -> None:
        """Train from the restored position to the end of the schedule: evaluations, records,
        best.pth and checkpoints when the schedule says, a step checkpoint every
        TRAIN.CHECKPOINT_MINUTES, and at SIGTERM, SIGUSR1 or SIGINT a step checkpoint and the
        end of the run at the next step boundary. ``loader``'s sampler is a ResumableSampler."""
        config, schedule, dist_info = self.config, self.schedule, self.dist_info
        self.evaluate = evaluate
        self.metrics = JsonLinesWriter(config.OUTPUT, dist_info.rank)
        self.metrics.keep_before(schedule.unit, schedule.first_to_redo(self.done, self.pending))  # each record once
        self.scalars = create_scalar_writer(config.OUTPUT, enabled=dist_info.is_main, purge_step=self.done or None)
        self.clock = CheckpointClock(config.TRAIN.CHECKPOINT_MINUTES)
        self.stop = StopSignals().install()
        self.logger.info("Start training")
        start_time = self.epoch_started = time.time()
        try:
            stopped = self._finish_position() if self.pending else False
            while not stopped and self.done < schedule.total_steps:
                epoch, step = divmod(self.done, schedule.steps_per_epoch)
                loader.sampler.set_epoch(epoch, step * config.DATA.BATCH_SIZE)
                self.epoch_started = time.time()
                stopped = self.train_steps(loader, losses, epoch, step, self._after_update)
        finally:
            self.stop.restore()
            self.scalars.close()
        summary = f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}"
        if dist_info.is_main and self.best is not None:
            summary += "; " + best_summary(config.OUTPUT, self.best, schedule.unit)
            write_curves(config.OUTPUT, self.logger)
        self.logger.info(summary)

    def _after_update(self) -> bool:
        """After each optimizer update: a stop signal (to any rank) saves a step checkpoint and
        stops, before an evaluation that is due (the relaunch evaluates); else the position is
        finished. True: stop now."""
        signal_name = self.stop.requested()
        if signal_name:
            pending = self.schedule.record_due(self.done)
            self._report_stop(signal_name, self._save_step_checkpoint(pending), pending)
            return True
        return self._finish_position()

    def _finish_position(self) -> bool:
        """What is due at this position: evaluation, record, best.pth, checkpoint; then a signal
        that came during them stops the run (at the checkpoint just written, or a new step
        checkpoint), and a step checkpoint is saved if TRAIN.CHECKPOINT_MINUTES have passed."""
        schedule, done = self.schedule, self.done
        self.pending = False
        saved = ""
        if schedule.record_due(done) or schedule.checkpoint_due(done):
            self.step_clock.pause()
            saved = self._evaluate_and_save()
            signal_name = "" if done >= schedule.total_steps else self.stop.requested()
            if signal_name:
                self._report_stop(signal_name, saved or self._save_step_checkpoint(False), False)
                return True
        if saved:
            self.clock.reset()
        elif self.clock.due():
            self._save_step_checkpoint(False)
        self.step_clock.pause()
        return False

    def _evaluate_and_save(self) -> str:
        """Evaluate and record (if due), then rank 0 writes best.pth (if better) and the
        checkpoint (if due), removing older step checkpoints and all but the newest
        KEEP_CHECKPOINTS. The record is written first: a kill before the checkpoint makes the
        relaunch redo this period and replace the record. Returns the checkpoint's path, or ''."""
        config, schedule, done, best = self.config, self.schedule, self.done, self.best
        self._check_finite()
        record, improved = None, False
        if schedule.record_due(done):
            if schedule.unit == "epoch":
                seconds = int(time.time() - self.epoch_started)
                self.logger.info(f"EPOCH {done // schedule.steps_per_epoch - 1} training takes "
                                 f"{datetime.timedelta(seconds=seconds)}")
            start = time.monotonic()
            results = self.evaluate()
            self.model.train()  # an evaluation inside an epoch (iterations) goes on training
            self.evaluation_seconds = time.monotonic() - start
            averages = self._averages(done - 1)
            record = {**schedule.record_entries(done), **{f"train_{name}": value for name, value in averages.items()
                                                          if name != "grad_norm"}, **results}
            if best is not None:
                improved = best.update(results[best.metric])
                record[best.record_key] = best.value
            record["lr"] = self.optimizer.param_groups[0]["lr"]
            self.sums = {}
        path = os.path.join(config.OUTPUT, schedule.checkpoint_name(done)) if schedule.checkpoint_due(done) else ""
        saved = []
        if self.dist_info.is_main:
            if record is not None:
                self.metrics.write(record)
                for key, value in record.items():
                    if key not in (schedule.unit, getattr(best, "record_key", None)) and isinstance(value, (int, float)):
                        self.scalars.add_scalar(f"{schedule.unit}/{key}", value, done)
            state = self.checkpoint(schedule.checkpoint_entries(done)) if improved or path else None
            if improved:
                write_checkpoint(state, os.path.join(config.OUTPUT, BEST_CHECKPOINT))
                saved.append(BEST_CHECKPOINT)
            if path:
                write_checkpoint(state, path)
                saved.insert(0, os.path.basename(path))
                remove_step_checkpoints(config.OUTPUT, family=schedule.checkpoints)  # older than this one now
                prune_checkpoints(config.OUTPUT, config.KEEP_CHECKPOINTS, schedule.checkpoints)
        where = f"saved {', '.join(saved)} in {config.OUTPUT}" if saved else ""
        if record is not None and best is not None:
            self.logger.info(best.running.format(best.value) + (f"; {where}" if where else ""))
        elif where:
            self.logger.info(where)
        return path

    def _report_stop(self, signal_name: str, path: str, pending: bool) -> None:
        self.logger.info(f"{signal_name} received: stopped at {self.schedule.where(self.done, pending)}, training "
                         f"state in {path}; relaunch the same command to resume from there")
