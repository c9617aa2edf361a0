"""Train, evaluate or benchmark CrossFormer: one process (CPU or GPU) or many (torchrun / launch).

    python main.py --cfg configs/demo/digits.yaml
    torchrun --nproc_per_node 8 main.py --cfg configs/crossformer/small_patch4_group7_224.yaml \
        --batch-size 128 --data-path IMAGENET --output output
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time
from contextlib import nullcontext
from typing import Callable, Iterable

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset
from yacs.config import CfgNode

from config import UserError, add_official_arguments, get_config
from data import build_loader
from logger import JsonLinesWriter, ScalarWriter, create_logger, create_scalar_writer, read_metrics
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from plot import write_curves
from runtime import (CheckpointClock, Precision, StopSignals, add_common_arguments, check_finite, compile_model,
                     launch, optimizer_step, setup_run)
from utils import (DistInfo, all_reduce_sum, derive_seed, load_checkpoint_file, load_pretrained, load_weights,
                   model_state, newest_loadable_checkpoint, prune_checkpoints, remove_step_checkpoints,
                   resume_position, write_checkpoint, seed_everything, step_checkpoint_path)

# (warm-up passes, timed passes) of --throughput
THROUGHPUT_PASSES = {"cuda": (50, 30), "cpu": (3, 10)}
BEST_CHECKPOINT = "best.pth"


def parse_option(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("CrossFormer training and evaluation", add_help=True)
    add_common_arguments(parser)
    add_official_arguments(parser)
    return parser.parse_args(argv)


def scale_learning_rates(config: CfgNode, world_size: int) -> None:
    """The official rule: rates are given for a global batch of 512, times accumulation steps."""
    factor = config.DATA.BATCH_SIZE * world_size / 512.0 * max(1, config.TRAIN.ACCUMULATION_STEPS)
    config.defrost()
    config.TRAIN.BASE_LR *= factor
    config.TRAIN.WARMUP_LR *= factor
    config.TRAIN.MIN_LR *= factor
    config.freeze()


def build_criterion(config: CfgNode, mixup: bool) -> nn.Module:
    """Soft-target loss with Mixup/CutMix, else label smoothing (MODEL.LABEL_SMOOTHING) or plain CE."""
    if mixup:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def main(config: CfgNode, dist_info: DistInfo) -> None:
    """Build data, model and optimizer, resume, then evaluate, benchmark or train."""
    device = dist_info.device
    logger = create_logger(config.OUTPUT, dist_info.rank)
    logger.info(f"world size {dist_info.world_size}, device {device}, output {config.OUTPUT}")
    logger.info(f"per process: {config.DATA.NUM_WORKERS} data-loading workers, {torch.get_num_threads()} torch threads")

    dataset_train, dataset_val, loader_train, loader_val, mixup_fn = build_loader(
        config, dist_info.rank, dist_info.world_size)
    model = build_model(config).to(device)
    flops = f", {model.flops() / 1e9:.3f} GFLOPs at {config.DATA.IMG_SIZE}" if hasattr(model, "flops") else ""
    logger.info(f"model {config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()):,} parameters{flops}")
    precision = Precision(config, device)
    logger.info(f"precision: {precision}")

    # --eval with MODEL_EMA_EVAL scores a checkpoint's EMA weights
    weights_key = "model_ema" if config.EVAL_MODE and config.MODEL_EMA_EVAL else "model"
    if config.MODEL.PRETRAINED and not config.MODEL.RESUME:
        skipped = load_pretrained(model, config.MODEL.PRETRAINED, config.TRUST_CHECKPOINTS, weights_key)
        if skipped:
            logger.warning(f"{config.MODEL.PRETRAINED}: the head has another class count; skipped {skipped}, "
                           "the new head starts fresh")
        logger.info(f"loaded pretrained weights from {config.MODEL.PRETRAINED}")
    ema = ModelEmaV3(model, decay=config.MODEL_EMA_DECAY) if config.MODEL_EMA and not config.EVAL_MODE else None
    if config.COMPILE:
        compile_model(model, any_size=config.EVAL_MODE or config.THROUGHPUT_MODE)
        logger.info("torch.compile: the first batches (and the first in eval mode) compile the model")

    model_without_ddp = model
    if dist_info.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False)

    if config.THROUGHPUT_MODE:
        throughput(loader_val, model, precision, device, logger)
        return

    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    updates_per_epoch = len(loader_train) // accumulation
    if updates_per_epoch < 1:
        raise UserError(f"TRAIN.ACCUMULATION_STEPS {accumulation} is larger than the {len(loader_train)} "
                        "batches of an epoch")
    optimizer = build_optimizer(config, model_without_ddp)
    lr_scheduler = build_scheduler(config, optimizer, updates_per_epoch)

    resume = config.MODEL.RESUME
    found = None
    if config.TRAIN.AUTO_RESUME and not config.EVAL_MODE:
        found = newest_loadable_checkpoint(config.OUTPUT, logger, config.TRUST_CHECKPOINTS)
        if found:
            if resume and resume != found[0]:
                logger.warning(f"auto-resume: using {found[0]} (newer than --resume {resume})")
            resume = found[0]
    start_epoch, start_step, max_accuracy, epoch_sums = config.TRAIN.START_EPOCH, 0, 0.0, {}
    if resume:
        checkpoint = found[1] if found else load_checkpoint_file(resume, config.TRUST_CHECKPOINTS)
        load_weights(model_without_ddp, model_state(checkpoint, resume, weights_key), resume)
        logger.info(f"loaded {'EMA ' if weights_key == 'model_ema' else ''}weights from {resume}")
        if not config.EVAL_MODE and "optimizer" in checkpoint:
            optimizer.load_state_dict(checkpoint["optimizer"])
            start_epoch, start_step = resume_position(checkpoint)
            written_by = (checkpoint.get("world_size"), checkpoint.get("batch_size"))
            if start_step and written_by != (dist_info.world_size, config.DATA.BATCH_SIZE):
                raise UserError(f"{resume} is a step checkpoint of {written_by[0]} processes x batch {written_by[1]}; "
                                f"this run has {dist_info.world_size} x {config.DATA.BATCH_SIZE}: relaunch with "
                                "those, or --resume an epoch checkpoint")
            if "scaler" in checkpoint:
                precision.scaler.load_state_dict(checkpoint["scaler"])
            max_accuracy = checkpoint.get("max_accuracy", 0.0)
            epoch_sums = checkpoint.get("epoch_sums", {})
            if ema is not None:
                if "model_ema" in checkpoint:
                    load_weights(ema.module, checkpoint["model_ema"], resume)
                else:
                    ema.set(model_without_ddp)
                    logger.warning(f"{resume} holds no EMA weights: the EMA starts from the loaded weights")
            if start_step:
                logger.info(f"resuming training inside epoch {start_epoch} at step {start_step} of "
                            f"{updates_per_epoch * accumulation}")
            elif start_epoch < config.TRAIN.EPOCHS:
                logger.info(f"resuming training at epoch {start_epoch}")
    # The schedule follows from the config and the update count (a checkpoint's copy is kept for
    # the official format): a run extended with --epochs gets the new one.
    lr_scheduler.step_update(start_epoch * updates_per_epoch + start_step // accumulation)

    if config.EVAL_MODE:
        validate(loader_val, model, precision, device, logger)
        return
    if start_epoch >= config.TRAIN.EPOCHS:
        logger.info(f"the run is complete: all {config.TRAIN.EPOCHS} epochs are trained ({resume}), nothing to do; "
                    f"to train longer, relaunch with --epochs N (N > {config.TRAIN.EPOCHS})")
        return
    logger.info(f"learning rates for a global batch of {config.DATA.BATCH_SIZE * dist_info.world_size}"
                f"{f' x {accumulation} accumulation steps' if accumulation > 1 else ''}: "
                f"base {config.TRAIN.BASE_LR:.4e}, warmup {config.TRAIN.WARMUP_LR:.4e}, min {config.TRAIN.MIN_LR:.4e}")

    train(config, dist_info, model, model_without_ddp, loader_train, loader_val, dataset_val, mixup_fn,
          optimizer, lr_scheduler, precision, start_epoch, max_accuracy, updates_per_epoch, logger,
          ema, start_step, epoch_sums)


def training_state(config: CfgNode, model: nn.Module, optimizer: Optimizer, lr_scheduler: Scheduler,
                   precision: Precision, ema: ModelEmaV3 | None, epoch: int, max_accuracy: float) -> dict:
    """A checkpoint: everything training needs to continue after ``epoch`` (``model`` unwrapped
    from DDP). A step checkpoint adds ``step`` and ``epoch_sums``."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": precision.scaler.state_dict(),
        "epoch": epoch,
        "max_accuracy": max_accuracy,
        "config": config.dump(),
        **({"model_ema": ema.module.state_dict()} if ema is not None else {}),
    }


def train(config: CfgNode, dist_info: DistInfo, model: nn.Module, model_without_ddp: nn.Module, loader_train: DataLoader,
          loader_val: DataLoader, dataset_val: Dataset, mixup_fn: Mixup | None, optimizer: Optimizer,
          lr_scheduler: Scheduler, precision: Precision, start_epoch: int, max_accuracy: float,
          updates_per_epoch: int, logger: logging.Logger, ema: ModelEmaV3 | None = None, start_step: int = 0,
          epoch_sums: dict | None = None) -> None:
    """The epoch loop: train, validate, save checkpoints and metrics. Training starts at batch
    ``start_step`` of ``start_epoch`` (``epoch_sums``: that epoch's loss sums so far). A step
    checkpoint is saved every TRAIN.CHECKPOINT_MINUTES; SIGTERM, SIGUSR1 or SIGINT ends the run
    at the next step boundary with one."""
    criterion = build_criterion(config, mixup_fn is not None)
    steps_per_epoch = updates_per_epoch * max(1, config.TRAIN.ACCUMULATION_STEPS)
    metrics = JsonLinesWriter(config.OUTPUT, dist_info.rank)
    metrics.keep_before("epoch", start_epoch)  # epochs trained again after a resume appear once
    scalars = create_scalar_writer(config.OUTPUT, enabled=dist_info.is_main,
                                   purge_step=start_epoch * steps_per_epoch if start_epoch else None)
    clock = CheckpointClock(config.TRAIN.CHECKPOINT_MINUTES)
    stop = StopSignals().install()

    def save_step_checkpoint(epoch: int, step: int, progress: dict[str, torch.Tensor]) -> str:
        """Rank 0 saves the state after the first ``step`` batches of ``epoch`` (never a state
        with a non-finite loss) and deletes the older step checkpoint."""
        if "bad_step" in progress:
            check_finite(progress["bad_step"], f"epoch {epoch}")
        path = step_checkpoint_path(config.OUTPUT, epoch, step)
        if dist_info.is_main:
            sums = {key: value.item() for key, value in progress.items() if key != "bad_step"}
            state = training_state(config, model_without_ddp, optimizer, lr_scheduler, precision, ema, epoch,
                                   max_accuracy)
            write_checkpoint({**state, "step": step, "epoch_sums": sums, "world_size": dist_info.world_size,
                             "batch_size": config.DATA.BATCH_SIZE}, path)
            remove_step_checkpoints(config.OUTPUT, keep=path)
            logger.info(f"{path} saved")
        clock.reset()
        return path

    def report_stop(signal_name: str, epoch: int, step: int, path: str) -> None:
        logger.info(f"{signal_name} received: stopped at epoch {epoch} step {step}, training state in {path}; "
                    "relaunch the same command to resume from there")

    stopped = False

    def at_step_boundary(epoch: int, step: int, progress: dict[str, torch.Tensor]) -> bool:
        """After each optimizer update: save a step checkpoint when one is due or a stop signal
        came (to any rank); True: stop now."""
        nonlocal stopped
        signal_name = stop.requested()
        if signal_name or clock.due():
            path = save_step_checkpoint(epoch, step, progress)
            if signal_name:
                report_stop(signal_name, epoch, step, path)
        stopped = bool(signal_name)
        return stopped

    logger.info("Start training")
    start_time = time.time()
    for epoch in range(start_epoch, config.TRAIN.EPOCHS):
        loader_train.sampler.set_epoch(epoch, start_step * config.DATA.BATCH_SIZE)
        train_loss = train_one_epoch(config, model, criterion, loader_train, optimizer, epoch, mixup_fn,
                                     lr_scheduler, precision, updates_per_epoch, dist_info, logger,
                                     ema, start_step, epoch_sums, at_step_boundary, scalars=scalars)
        start_step, epoch_sums = 0, {}
        if stopped:
            break
        acc1, acc5, val_loss = validate(loader_val, model, precision, dist_info.device, logger)
        ema_record = {}
        if ema is not None:
            ema_acc1, ema_acc5, ema_loss = validate(loader_val, ema.module, precision, dist_info.device, logger,
                                                    label="EMA")
            ema_record = {"ema_acc1": ema_acc1, "ema_acc5": ema_acc5, "ema_val_loss": ema_loss}
        selected = ema_record["ema_acc1"] if ema_record and config.MODEL_EMA_EVAL else acc1
        improved = selected > max_accuracy
        max_accuracy = max(max_accuracy, selected)
        last = epoch == config.TRAIN.EPOCHS - 1
        epoch_saved = epoch % config.SAVE_FREQ == 0 or last
        saved = []
        if dist_info.is_main:
            state = training_state(config, model_without_ddp, optimizer, lr_scheduler, precision, ema, epoch,
                                   max_accuracy)
            if hasattr(dataset_val, "classes"):  # image folders: predict.py names the classes
                state["classes"] = list(dataset_val.classes)
            if epoch_saved:
                write_checkpoint(state, os.path.join(config.OUTPUT, f"ckpt_epoch_{epoch}.pth"))
                saved.append(f"ckpt_epoch_{epoch}.pth")
                remove_step_checkpoints(config.OUTPUT)  # older than this one now
                prune_checkpoints(config.OUTPUT, config.KEEP_CHECKPOINTS)
            if improved:
                write_checkpoint(state, os.path.join(config.OUTPUT, BEST_CHECKPOINT))
                saved.append(BEST_CHECKPOINT)
            record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "acc1": acc1, "acc5": acc5,
                      **ema_record, "max_accuracy": max_accuracy, "lr": optimizer.param_groups[0]["lr"]}
            metrics.write(record)
            for key in ("train_loss", "val_loss", "acc1", "acc5", "lr"):
                scalars.add_scalar(f"epoch/{key}", record[key], (epoch + 1) * steps_per_epoch)
        logger.info(f"Max accuracy: {max_accuracy:.2f}%" + (f"; saved {', '.join(saved)} in {config.OUTPUT}" if saved else ""))
        if epoch_saved:
            clock.reset()
        signal_name = "" if last else stop.requested()  # a signal during validation stops here
        if signal_name:
            path = (os.path.join(config.OUTPUT, f"ckpt_epoch_{epoch}.pth") if epoch_saved
                    else save_step_checkpoint(epoch + 1, 0, {}))
            report_stop(signal_name, epoch + 1, 0, path)
            break
    stop.restore()
    scalars.close()
    summary = f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}"
    if dist_info.is_main:
        summary += "; " + best_epoch_summary(config.OUTPUT)
        write_curves(config.OUTPUT, logger)
    logger.info(summary)


def best_epoch_summary(output_dir: str) -> str:
    """Which epoch was best, its top-1, and where ``best.pth`` is (from ``metrics.jsonl``)."""
    records = [r for r in read_metrics(output_dir) if "acc1" in r]
    if not records:
        return "no epoch was validated"
    best = max(records, key=lambda r: r["acc1"])  # the first of equal ones, as best.pth keeps it
    return (f"best Acc@1 {best['acc1']:.3f} (Acc@5 {best['acc5']:.3f}) at epoch {best['epoch']}, "
            f"weights in {os.path.join(output_dir, BEST_CHECKPOINT)}")


def train_one_epoch(config: CfgNode, model: nn.Module, criterion: nn.Module, loader: Iterable,
                    optimizer: Optimizer, epoch: int, mixup_fn: Mixup | None, lr_scheduler: Scheduler,
                    precision: Precision, updates_per_epoch: int, dist_info: DistInfo,
                    logger: logging.Logger, ema: ModelEmaV3 | None = None, start_step: int = 0,
                    epoch_sums: dict | None = None,
                    at_step_boundary: Callable[[int, int, dict], bool] | None = None,
                    scalars: ScalarWriter | None = None) -> float:
    """One epoch, or its rest from batch ``start_step`` on (the loader then starts there too;
    ``epoch_sums`` holds the loss and grad-norm sums of the batches before). Every case (AMP or
    not, accumulation or not, DDP or not) takes the same path. The main process's randomness
    (Mixup/CutMix, drop path) is seeded per batch from (SEED, epoch, batch, rank), so a resumed
    epoch draws what the uninterrupted one drew. After each optimizer update the EMA follows and
    ``at_step_boundary(epoch, batches done, progress)`` runs; when it returns True the epoch stops
    there. Losses and norms stay on the device; the host reads them only every PRINT_FREQ steps,
    which is also when loss, LR and grad-norm go to ``scalars`` (TensorBoard), by global step.
    Returns the epoch's mean training loss (over all its batches when it was not stopped)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    device = dist_info.device
    model_without_ddp = model.module if isinstance(model, DistributedDataParallel) else model
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    num_steps = updates_per_epoch * accumulation  # a trailing partial accumulation is left out
    epoch_sums = epoch_sums or {}
    loss_sum = torch.tensor(epoch_sums.get("loss_sum", 0.0), device=device, dtype=torch.float64)
    last_loss = torch.zeros((), device=device)
    grad_norm = torch.zeros((), device=device)
    norm_sum = torch.tensor(epoch_sums.get("grad_norm_sum", 0.0), device=device, dtype=torch.float64)
    bad_step = torch.full((), -1, device=device)  # first step with a non-finite loss
    stopped = False
    start = batch_start = time.time()
    for idx, (samples, targets) in enumerate(loader, start=start_step):
        if idx >= num_steps:
            break
        seed_everything(derive_seed(config.SEED, epoch, idx, dist_info.rank))
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        update = (idx + 1) % accumulation == 0
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not update else nullcontext()
        with sync:
            with precision.autocast():
                loss = criterion(model(samples), targets)
            precision.scaler.scale(loss / accumulation).backward()
        last_loss = loss.detach().float()
        loss_sum += last_loss
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(last_loss), idx, bad_step)
        if update:
            grad_norm = optimizer_step(model, optimizer, precision, config.TRAIN.CLIP_GRAD)
            norm_sum += grad_norm.float()
            update_count = epoch * updates_per_epoch + (idx + 1) // accumulation
            lr_scheduler.step_update(update_count)
            if ema is not None:
                ema.update(model_without_ddp, step=update_count)
        if idx % config.PRINT_FREQ == 0 or idx == num_steps - 1:
            check_finite(bad_step, f"epoch {epoch}")
            batch_time = (time.time() - start) / (idx + 1 - start_step)
            eta = batch_time * (num_steps - idx - 1)
            eta_run = eta + batch_time * num_steps * (config.TRAIN.EPOCHS - epoch - 1)  # validation not counted
            lr, loss_now, norm_now = optimizer.param_groups[0]["lr"], last_loss.item(), grad_norm.item()
            memory = f"\tmem {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}MB" if device.type == "cuda" else ""
            logger.info(
                f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{num_steps}]\t"
                f"eta {datetime.timedelta(seconds=int(eta))} (run {datetime.timedelta(seconds=int(eta_run))}) "
                f"lr {lr:.4e}\t"
                f"time {time.time() - batch_start:.4f} ({batch_time:.4f})\t"
                f"loss {loss_now:.4f} ({loss_sum.item() / (idx + 1):.4f})\t"
                f"grad_norm {norm_now:.4f} ({norm_sum.item() / max(1, (idx + 1) // accumulation):.4f})"
                f"{memory}")
            if scalars is not None:
                step = epoch * num_steps + idx
                for key, value in (("loss", loss_now), ("lr", lr), ("grad_norm", norm_now)):
                    scalars.add_scalar(f"train/{key}", value, step)
        if update and at_step_boundary is not None and at_step_boundary(
                epoch, idx + 1, {"loss_sum": loss_sum, "grad_norm_sum": norm_sum, "bad_step": bad_step}):
            stopped = True
            break
        batch_start = time.time()
    check_finite(bad_step, f"epoch {epoch}")
    if not stopped:
        logger.info(f"EPOCH {epoch} training takes {datetime.timedelta(seconds=int(time.time() - start))}")
    return loss_sum.item() / num_steps


@torch.no_grad()
def validate(loader: Iterable, model: nn.Module, precision: Precision, device: torch.device,
             logger: logging.Logger, label: str = "") -> tuple[float, float, float]:
    """Top-1/top-5 accuracy and loss over the whole validation set: every rank counts its own
    images and the counts are summed, so the result does not depend on the number of ranks.
    ``label`` names the weights in the log line (``EMA * Acc@1 ...``)."""
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # correct@1, correct@5, loss sum, images
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        totals += torch.stack([top[:, 0].sum(), top.sum(), nn.functional.cross_entropy(logits, targets, reduction="sum"),
                               torch.tensor(len(targets), device=device)]).double()
    correct1, correct5, loss_sum, count = all_reduce_sum(totals).tolist()
    acc1, acc5, loss = 100 * correct1 / count, 100 * correct5 / count, loss_sum / count
    logger.info(f"{label} * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.4f} on {int(count)} val images")
    return acc1, acc5, loss


@torch.no_grad()
def throughput(loader: Iterable, model: nn.Module, precision: Precision, device: torch.device,
               logger: logging.Logger) -> None:
    """Images per second of forward passes on one batch (``batch_size N throughput X``)."""
    model.eval()
    images = next(iter(loader))[0].to(device)
    warmup, timed = THROUGHPUT_PASSES.get(device.type, THROUGHPUT_PASSES["cpu"])
    with precision.autocast():
        for _ in range(warmup):
            model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        logger.info(f"throughput averaged over {timed} passes, precision: {precision}")
        start = time.time()
        for _ in range(timed):
            model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
    logger.info(f"batch_size {images.shape[0]} throughput {timed * images.shape[0] / (time.time() - start):.1f} images/s")


def run(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code; bad input is one line on stderr and exit code 2."""
    args = parse_option(argv)

    def job() -> None:
        config = get_config(args)
        dist_info = setup_run(config)
        scale_learning_rates(config, dist_info.world_size)
        main(config, dist_info)

    return launch(job)


if __name__ == "__main__":
    sys.exit(run())
