"""Distributed set-up, seeding, and checkpoint files (written crash-safe, read without running code)."""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
import random
import re

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from config import UserError


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "") -> DistInfo:
    """Join the process group a launcher (torchrun, torch.distributed.launch) describes through
    RANK/WORLD_SIZE, or run as the only process without one. NCCL on CUDA, gloo on CPU."""
    if device:
        try:
            wanted = torch.device(device)
        except RuntimeError as err:
            raise UserError(f"--device {device!r} is not a device name: {err}") from err
        if wanted.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {device} asked for CUDA, but no CUDA device is available")
    else:
        wanted = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if wanted.type == "cuda":
        index = local_rank if wanted.index is None else wanted.index
        torch.cuda.set_device(index)
        wanted = torch.device("cuda", index)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo", store=_launcher_store(rank, world_size),
                                rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, wanted)


def _launcher_store(rank: int, world_size: int) -> dist.Store:
    """The launcher's key-value store, with this restart's keys kept apart from earlier ones.

    Under ``torchrun --max-restarts`` the store can outlive the workers; without a prefix per
    restart, a restarted group reads the dead workers' addresses and cannot connect.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_hosts_store, multi_tenant=True)
    return dist.PrefixStore(f"crossformer/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (the tensor itself when there is no process group)."""
    if dist.is_available() and dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's epoch: an epoch replays identically after a resume."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2 ** 63


# ----------------------------------------------------------------------------- checkpoint files
def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` to a temporary file beside ``path``, flush it to disk, rename it into place:
    a kill at any moment leaves either the old file or the complete new one."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint_file(path: str, trust: bool = False) -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``: tensors and plain containers only,
    so nothing in the file can run. A file that needs full unpickling is refused unless ``trust``.
    Any failure is a UserError naming the file and the reason."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged or foreign files
        refused = re.search(r"WeightsUnpickler error: (.*)", str(err))
        if refused is None:
            raise UserError(f"cannot read checkpoint {path}: damaged or not a PyTorch file "
                            f"({type(err).__name__}: {_first_line(err)[:200]})") from err
        if not trust:
            raise UserError(f"refusing to load {path}: it needs full unpickling, which can run code "
                            f"({refused.group(1).split(' was not an allowed')[0]}); pass --trust-checkpoints only if you trust the file") from err
        checkpoint = _load_trusted(path)
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def _load_trusted(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a trusted file may still be damaged
        raise UserError(f"cannot read checkpoint {path}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def model_state(checkpoint: dict, path: str) -> dict:
    """The model weights in a checkpoint: its ``model`` entry, or the dict itself if it is a
    bare state dict."""
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no model weights: expected a 'model' entry or a state dict of "
                        f"tensors, found keys {sorted(map(str, checkpoint))[:6]}")
    return state


def load_weights(model: nn.Module, state: dict, path: str, skip: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model`` exactly (except keys starting with a ``skip`` prefix); a
    mismatch is a UserError listing a few differing keys and shapes. Entries the model derives
    itself (the ICLR code's DPB index buffers) are dropped by the model's own load hook."""
    ours = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    problems = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
                for k, v in sorted(state.items()) if k in ours and v.shape != ours[k].shape]
    if not problems:
        result = model.load_state_dict(state, strict=False)
        problems = [f"missing {k}" for k in sorted(result.missing_keys) if not k.startswith(skip)]
        problems += [f"unexpected {k}" for k in sorted(result.unexpected_keys)]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise UserError(f"{path} does not fit this model ({len(problems)} differences): {shown}")


def load_pretrained(model: nn.Module, path: str, trust: bool = False) -> list[str]:
    """Load the weights of a checkpoint or released model file into ``model`` (for evaluation or
    fine-tuning). A classifier head of another class count is left out: its keys are returned."""
    state = model_state(load_checkpoint_file(path, trust), path)
    ours = model.state_dict()
    head = sorted(k for k in state if k.startswith("head."))
    other_head = any(k in ours and state[k].shape != ours[k].shape for k in head)
    load_weights(model, state, path, skip=("head.",) if other_head else ())
    return head if other_head else []


def epoch_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``(epoch, path)`` of every ``ckpt_epoch_N.pth`` in ``output_dir``, newest first."""
    return numbered_checkpoints(output_dir, "ckpt_epoch_")


def numbered_checkpoints(output_dir: str, prefix: str) -> list[tuple[int, str]]:
    """``(N, path)`` of every ``<prefix>N.pth`` in ``output_dir`` (epochs, iterations), newest first."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.pth$")
    found = []
    for path in glob.glob(os.path.join(glob.escape(output_dir), glob.escape(prefix) + "*.pth")):
        match = pattern.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def newest_loadable_checkpoint(output_dir: str, logger: logging.Logger, trust: bool = False,
                               prefix: str = "ckpt_epoch_",
                               required: tuple[str, ...] = ("model", "optimizer", "lr_scheduler", "epoch"),
                               ) -> tuple[str, dict] | None:
    """The newest ``<prefix>N.pth`` checkpoint that loads and holds the ``required`` entries
    (never ``best.pth``); damaged ones are reported with their path and reason, and skipped."""
    for _, path in numbered_checkpoints(output_dir, prefix):
        try:
            checkpoint = load_checkpoint_file(path, trust)
            for key in required:
                if key not in checkpoint:
                    raise UserError(f"{path} lacks the '{key}' entry of a training checkpoint")
            return path, checkpoint
        except UserError as err:
            logger.warning(f"skipping damaged checkpoint {path}: {err}")
    return None
