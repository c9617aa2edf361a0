"""What every training script here shares (classification, detection, segmentation): the common
command-line flags, run set-up, mixed precision, the non-finite-loss stop, and the exit-code
convention (bad input: one line on stderr and exit 2; non-finite loss: exit 3)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch
import torch.distributed as dist
from yacs.config import CfgNode

from config import UserError
from utils import DistInfo, init_distributed, seed_everything


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every training script takes; get_config maps them onto config keys."""
    parser.add_argument("--cfg", type=str, required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--opts", default=None, nargs="+", help="override config options: KEY VALUE pairs")
    parser.add_argument("--batch-size", type=int, help="batch size per process")
    parser.add_argument("--data-path", type=str, help="path to dataset")
    parser.add_argument("--resume", help="resume from a checkpoint")
    parser.add_argument("--pretrained", help="fine-tune from these weights (a head of another size is dropped)")
    parser.add_argument("--amp-opt-level", type=str, choices=["O0", "O1", "O2"],
                        help="O0: no mixed precision; O1/O2: native mixed precision (apex is not used)")
    parser.add_argument("--amp-dtype", type=str, choices=["float16", "bfloat16"], help="mixed-precision type")
    parser.add_argument("--output", default="output", type=str, metavar="PATH",
                        help="root of output folders: <output>/<model name>/<tag>")
    parser.add_argument("--tag", help="tag of experiment")
    parser.add_argument("--eval", action="store_true", help="only evaluate")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--device", type=str, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--trust-checkpoints", action="store_true",
                        help="allow checkpoints that need full unpickling (can run code): only for files you trust")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0,
                        help="set by torch.distributed.launch; torchrun uses LOCAL_RANK")


def prepare_output(path: str) -> None:
    """Create the run folder, or a UserError if it cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise UserError(f"cannot write to output folder {path}: {err.strerror or err}") from err


def setup_run(config: CfgNode) -> DistInfo:
    """Join the process group (if launched), create the run folder, seed, set cuDNN flags."""
    dist_info = init_distributed(config.DEVICE)
    prepare_output(config.OUTPUT)
    seed_everything(config.SEED + dist_info.rank)
    torch.backends.cudnn.benchmark = not config.DETERMINISTIC
    if config.DETERMINISTIC:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return dist_info


def launch(job: Callable[[], None]) -> int:
    """Run ``job`` and return the exit code: 0, 2 for a UserError (one line on stderr), 3 for a
    non-finite loss. The process group, if any, is torn down either way."""
    try:
        job()
        code = 0
    except (UserError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2 if isinstance(err, UserError) else 3
    if dist.is_available() and dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    return code


class Precision:
    """Autocast settings: AMP_OPT_LEVEL O0 is float32; otherwise AMP_DTYPE, except that float16
    autocast is only used on CUDA (a CPU run stays in float32 unless bfloat16 is asked for)."""

    def __init__(self, config: CfgNode, device: torch.device):
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(config.AMP_DTYPE)
        if dtype is None:
            raise UserError(f"AMP_DTYPE must be float16 or bfloat16, got {config.AMP_DTYPE!r}")
        self.device_type = device.type
        self.enabled = config.AMP_OPT_LEVEL != "O0" and (dtype == torch.bfloat16 or device.type == "cuda")
        self.dtype = dtype
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.enabled and dtype == torch.float16)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def __str__(self) -> str:
        return f"autocast {str(self.dtype).replace('torch.', '')}" if self.enabled else "float32"


def check_finite(bad_step: torch.Tensor, where: str) -> None:
    """Stop at the first step whose loss was not finite (``bad_step`` >= 0); ``where`` names the
    epoch or iteration."""
    step = int(bad_step.item())
    if step >= 0:
        raise NonFiniteLossError(f"loss is not finite at {where} step {step}; stopping without saving "
                                 "(the last checkpoint is kept)")


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                   clip_grad: float) -> torch.Tensor:
    """One update after the (scaled) backward: unscale, clip to ``clip_grad`` (0: no clipping,
    the norm is still measured), step, update the scaler, zero the gradients. Returns the norm."""
    precision.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad if clip_grad > 0 else float("inf"))
    precision.scaler.step(optimizer)
    precision.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
