"""Distributed set-up, seeding, and checkpoint files (written crash-safe, read without running code)."""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import logging
import os
import pickletools
import random
import re
import urllib.parse
import zipfile
from typing import BinaryIO, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from config import UserError


@dataclasses.dataclass(frozen=True)
class CheckpointFamily:
    """The file names of one kind of training run. ``<prefix>N.pth`` holds the state after N
    epochs or iterations; a step checkpoint (``step_name`` filled with the numbers that
    ``step_pattern`` reads back) holds a state between those. ``numbered_offset``: where
    ``<prefix>N.pth`` continues, as the first number of a step checkpoint (epoch N + 1, or
    iteration N). ``required``: the entries a loadable training checkpoint has (a step checkpoint
    also ``step_required``)."""
    prefix: str
    step_name: str
    step_pattern: re.Pattern
    numbered_offset: int
    required: tuple[str, ...]
    step_required: tuple[str, ...] = ()


EPOCH_CHECKPOINTS = CheckpointFamily("ckpt_epoch_", "ckpt_epoch_{}_step_{}.pth",
                                     re.compile(r"ckpt_epoch_(\d+)_step_(\d+)\.pth$"), 1, ("model", "optimizer", "epoch"),
                                     ("step",))
ITERATION_CHECKPOINTS = CheckpointFamily("ckpt_iter_", "ckpt_iter_{}_step.pth", re.compile(r"ckpt_iter_(\d+)_step\.pth$"),
                                         0, ("model", "optimizer", "iteration"))
EPOCH_CHECKPOINT_PREFIX = EPOCH_CHECKPOINTS.prefix
BEST_CHECKPOINT = "best.pth"  # the weights that scored best so far: never resumed from automatically


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
    """Join the process group the caller already initialised, or the one a launcher (torchrun,
    torch.distributed.launch) describes through RANK/WORLD_SIZE (NCCL on CUDA, gloo on CPU), or
    run as the only process without one."""
    if device:
        try:
            wanted = torch.device(device)
        except RuntimeError as err:
            raise UserError(f"--device {device!r} is not a device name: {err}") from err
        if wanted.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {device} asked for CUDA, but no CUDA device is available")
    else:
        wanted = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    joined = dist.is_available() and dist.is_initialized()  # the caller made the group (the authors' scripts)
    if joined:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if wanted.type == "cuda":
        index = local_rank if wanted.index is None else wanted.index
        torch.cuda.set_device(index)
        wanted = torch.device("cuda", index)
    if not joined and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo", store=_launcher_store(rank, world_size),
                                rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, wanted)


def process_info(device: torch.device) -> DistInfo:
    """This process in the process group, if there is one (else rank 0 of 1), computing on ``device``."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), device)
    return DistInfo(0, 1, 0, device)


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


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a hash of ``parts`` (e.g. seed, epoch, sample index): streams of
    neighbouring tuples are unrelated, and the same tuple always gives the same seed."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ----------------------------------------------------------------------------- checkpoint files
def write_checkpoint(state: dict, path: str) -> None:
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
    Any failure is a UserError naming the file and the reason: not found, not a checkpoint at
    all, refused (naming the Python objects it imports), or damaged."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    file_format = _checkpoint_format(path)
    if file_format == "empty":
        raise UserError(f"cannot read checkpoint {path}: the file is empty (damaged)")
    if file_format is None:
        raise UserError(f"{path} is not a checkpoint: not a file written by torch.save")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged or foreign files
        unsafe = _unsafe_globals(path, file_format)
        if not unsafe:
            raise UserError(f"cannot read checkpoint {path}: damaged or not a PyTorch file "
                            f"({type(err).__name__}: {_first_line(err)[:200]})") from err
        if not trust:
            raise UserError(f"refusing to load {path}: it needs full unpickling, which can run code (it imports "
                            f"{', '.join(unsafe[:5])}); pass --trust-checkpoints only if you trust the file") from err
        checkpoint = _load_trusted(path)
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def _checkpoint_format(path: str) -> str | None:
    """From the first bytes: ``"zip"`` (torch.save since torch 1.6, maybe truncated),
    ``"legacy"`` (an older torch.save: a pickle stream), ``"empty"``, or None for anything else
    (a text file, an image, ...)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "empty"
    if head == ZIP_MAGIC:
        return "zip"
    return "legacy" if len(head) >= 2 and head[0] == PICKLE_PROTO and 2 <= head[1] <= 5 else None


def _unsafe_globals(path: str, file_format: str) -> list[str]:
    """The Python objects (``module.name``) a checkpoint imports that ``weights_only`` loading
    refuses; empty when the file cannot be read that far (it is damaged). Zip checkpoints are
    asked through torch's own ``get_unsafe_globals_in_checkpoint``. It does not read the legacy
    format (nor exists before torch 2.5): there the pickle opcodes are listed without running
    them, and every import outside torch is reported."""
    if file_format == "zip" and hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - a file it cannot parse is a damaged one
            return []
    try:
        if file_format == "zip":
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
                imports = _pickle_imports(io.BytesIO(archive.read(name)))
        else:
            with open(path, "rb") as f:  # pickles: magic number, protocol, system info, the object
                imports = [name for _ in range(LEGACY_PICKLES) for name in _pickle_imports(f)]
    except Exception:  # noqa: BLE001 - truncated or not a pickle
        return []
    return sorted({name for name in imports if name.split(".")[0] not in SAFE_PICKLE_MODULES})


ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80  # first byte of a pickle of protocol 2 or later
LEGACY_PICKLES = 4
# modules whose objects torch's weights-only unpickler rebuilds (tensors, storages, containers)
SAFE_PICKLE_MODULES = ("torch", "collections", "builtins", "_codecs")


def _pickle_imports(stream: BinaryIO) -> list[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL in the next pickle of ``stream``, read with
    ``pickletools`` (which decodes opcodes and never imports or calls anything)."""
    names, strings = [], []
    for opcode, argument, _ in pickletools.genops(stream):
        if opcode.name == "GLOBAL":
            names.append(argument.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(argument, str):
            strings.append(argument)
        if opcode.name == "STOP":
            break
    return names


def _load_trusted(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a trusted file may still be damaged
        raise UserError(f"cannot read checkpoint {path}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def model_state(checkpoint: dict, path: str, key: str = "model") -> dict:
    """The model weights in a checkpoint: its ``model`` entry, or the dict itself if it is a
    bare state dict; with ``key='model_ema'``, the EMA weights (which must be there)."""
    if key != "model" and key not in checkpoint:
        raise UserError(f"{path} has no '{key}' entry: it was saved without MODEL_EMA")
    state = checkpoint.get(key, checkpoint)
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


def load_pretrained(model: nn.Module, path: str, trust: bool = False, key: str = "model") -> list[str]:
    """Load the weights (``key``: ``model`` or ``model_ema``) of a checkpoint or released model file
    into ``model`` (for evaluation or fine-tuning). A classifier head of another class count is
    left out: its keys are returned."""
    state = model_state(load_checkpoint_file(path, trust), path, key)
    ours = model.state_dict()
    head = sorted(k for k in state if k.startswith("head."))
    other_head = any(k in ours and state[k].shape != ours[k].shape for k in head)
    load_weights(model, state, path, skip=("head.",) if other_head else ())
    return head if other_head else []


def numbered_checkpoints(output_dir: str, prefix: str) -> list[tuple[int, str]]:
    """``(N, path)`` of every ``<prefix>N.pth`` in ``output_dir`` (epochs, iterations), newest first."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.pth$")
    found = []
    for path in glob.glob(os.path.join(glob.escape(output_dir), glob.escape(prefix) + "*.pth")):
        match = pattern.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def step_checkpoint_path(output_dir: str, epoch: int, step: int) -> str:
    """``ckpt_epoch_E_step_K.pth``: the training state after the first K batches of epoch E."""
    return os.path.join(output_dir, EPOCH_CHECKPOINTS.step_name.format(epoch, step))


def step_checkpoints(output_dir: str, family: CheckpointFamily = EPOCH_CHECKPOINTS) -> list[tuple[tuple[int, ...], str]]:
    """``(numbers, path)`` of every step checkpoint of ``family`` in ``output_dir``, newest first:
    ``((epoch, step), path)`` for epochs, ``((iteration,), path)`` for iterations."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(output_dir), glob.escape(family.prefix) + "*.pth")):
        match = family.step_pattern.search(os.path.basename(path))
        if match:
            found.append((tuple(map(int, match.groups())), path))
    return sorted(found, reverse=True)


def remove_step_checkpoints(output_dir: str, keep: str = "", family: CheckpointFamily = EPOCH_CHECKPOINTS) -> None:
    """Delete the step checkpoints in ``output_dir`` except ``keep``: only the newest is kept."""
    for _, path in step_checkpoints(output_dir, family):
        if not keep or os.path.abspath(path) != os.path.abspath(keep):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


def resume_position(checkpoint: dict) -> tuple[int, int]:
    """``(epoch, step)`` where training continues from ``checkpoint``: a step checkpoint holds
    the epoch in progress and the batches of it already trained; an epoch checkpoint ends its
    epoch, so training continues at the start of the next one."""
    if "step" in checkpoint:
        return int(checkpoint["epoch"]), int(checkpoint["step"])
    return int(checkpoint["epoch"]) + 1, 0


def newest_loadable_checkpoint(output_dir: str, logger: logging.Logger, trust: bool = False,
                               family: CheckpointFamily = EPOCH_CHECKPOINTS) -> tuple[str, dict] | None:
    """The loadable training checkpoint (never ``best.pth``) that continues furthest along: the
    ``<prefix>N.pth`` files and the step checkpoints of ``family`` that hold its required
    entries. Damaged ones are reported with their path and reason, and skipped."""
    candidates = [((number + family.numbered_offset, 0), path) for number, path in numbered_checkpoints(output_dir, family.prefix)]
    candidates += [((numbers + (0,))[:2], path) for numbers, path in step_checkpoints(output_dir, family)]
    for _, path in sorted(candidates, reverse=True):
        try:
            checkpoint = load_checkpoint_file(path, trust)
            is_step = family.step_pattern.search(os.path.basename(path)) is not None
            for key in family.required + (family.step_required if is_step else ()):
                if key not in checkpoint:
                    raise UserError(f"{path} lacks the '{key}' entry of a training checkpoint")
            return path, checkpoint
        except UserError as err:
            logger.warning(f"skipping damaged checkpoint {path}: {err}")
    return None


def prune_checkpoints(output_dir: str, keep: int, family: CheckpointFamily = EPOCH_CHECKPOINTS) -> list[str]:
    """Delete all but the newest ``keep`` ``<prefix>N.pth`` files (``keep`` 0 keeps all);
    ``best.pth`` and step checkpoints are not among them and stay. Returns the deleted paths."""
    if keep <= 0:
        return []
    deleted = [path for _, path in numbered_checkpoints(output_dir, family.prefix)[keep:]]
    for path in deleted:
        os.remove(path)
    return deleted


# ----------------------------------------------------------------------------- the authors' utils.py API
# Their names, signatures and return values, on top of the functions above: checkpoints are read
# without running code and must fit the model exactly, and are written crash-safe.
LAST_CHECKPOINT = "last.pth"  # the CrossFormer++ code's checkpoint of the newest epoch
TRAINING_ENTRIES = ("model", "optimizer", "lr_scheduler", "epoch")

_logger = logging.getLogger(f"crossformer.{__name__}")  # reaches the run log


def _local_checkpoint(path: str) -> str:
    """``path``, or for an http(s) URL the copy in torch's hub folder, downloaded once (the authors'
    ``load_checkpoint`` took https URLs; a sha256 prefix in the file name is checked, as there)."""
    if not path.startswith(("https://", "http://")):
        return path
    name = os.path.basename(urllib.parse.urlparse(path).path)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        hash_match = torch.hub.HASH_REGEX.search(name)
        try:
            torch.hub.download_url_to_file(path, cached, hash_match.group(1) if hash_match else None, progress=False)
        except (OSError, RuntimeError, ValueError) as err:  # unreachable, HTTP error, hash mismatch
            raise UserError(f"cannot download checkpoint {path}: {_first_line(err)}") from err
    return cached


def load_checkpoint(config, model: nn.Module, optimizer: torch.optim.Optimizer | None, lr_scheduler,
                    logger: logging.Logger) -> float:
    """Resume from ``config.MODEL.RESUME`` (a file or an http(s) URL): the weights into ``model``
    (exactly: a mismatch is a UserError) and, unless ``config.EVAL_MODE``, the optimizer state
    and ``config.TRAIN.START_EPOCH`` (the epoch after the checkpoint's). Returns the checkpoint's
    max accuracy (0.0 in eval mode or for weights only).

    ``lr_scheduler`` is accepted for the authors' signature; as in main.py the schedule follows
    the config, and the training loop's ``step_update`` sets its position. A step checkpoint
    (main.py's, inside an epoch) restarts its epoch from the first batch here."""
    path = _local_checkpoint(config.MODEL.RESUME)
    checkpoint = load_checkpoint_file(path, config.TRUST_CHECKPOINTS)
    load_weights(model, model_state(checkpoint, path), path)
    logger.info(f"loaded weights from {config.MODEL.RESUME}")
    if config.EVAL_MODE or optimizer is None or not all(key in checkpoint for key in TRAINING_ENTRIES):
        return 0.0
    optimizer.load_state_dict(checkpoint["optimizer"])
    epoch, step = resume_position(checkpoint)
    if step:
        logger.warning(f"{path} was saved after step {step} of epoch {epoch}: epoch {epoch} restarts from its "
                       "first batch (main.py continues at that step)")
    frozen = config.is_frozen()
    config.defrost()
    config.TRAIN.START_EPOCH = epoch
    if frozen:
        config.freeze()
    logger.info(f"resuming training at epoch {epoch}")
    return float(checkpoint.get("max_accuracy", 0.0))


def save_checkpoint(config, epoch: int, model: nn.Module, max_accuracy: float, optimizer: torch.optim.Optimizer,
                    lr_scheduler, logger: logging.Logger, best: bool = False, last: bool = False) -> str:
    """Write the training state after ``epoch`` to ``config.OUTPUT``: ``ckpt_epoch_<epoch>.pth``,
    or ``best.pth`` with ``best``, or ``last.pth`` with ``last`` (the CrossFormer++ signature).
    Crash-safe, readable without unpickling code, and resumable by main.py. Returns the path."""
    name = LAST_CHECKPOINT if last else BEST_CHECKPOINT if best else f"{EPOCH_CHECKPOINT_PREFIX}{epoch}.pth"
    path = os.path.join(config.OUTPUT, name)
    os.makedirs(config.OUTPUT, exist_ok=True)
    write_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "lr_scheduler": lr_scheduler.state_dict(), "max_accuracy": max_accuracy, "epoch": epoch,
                      "config": config.dump()}, path)
    logger.info(f"{path} saved")
    return path


def auto_resume_helper(output_dir: str) -> str | None:
    """The checkpoint in ``output_dir`` to resume from, or None: the newest loadable training
    checkpoint (``newest_loadable_checkpoint``: by the epoch it holds, not by file time; never
    ``best.pth``; damaged files are reported and skipped), or ``last.pth`` when it holds a later
    epoch. Files that need full unpickling are skipped too (use ``--trust-checkpoints`` with main.py)."""
    found = newest_loadable_checkpoint(output_dir, _logger)
    last = os.path.join(output_dir, LAST_CHECKPOINT)
    if os.path.isfile(last):
        try:
            checkpoint = load_checkpoint_file(last)
            missing = [key for key in TRAINING_ENTRIES if key not in checkpoint]
            if missing:
                raise UserError(f"{last} lacks the '{missing[0]}' entry of a training checkpoint")
        except UserError as err:
            _logger.warning(f"skipping damaged checkpoint {last}: {err}")
        else:
            if found is None or resume_position(checkpoint) > resume_position(found[1]):
                return last
    return found[0] if found else None


def get_grad_norm(parameters: torch.Tensor | Iterable[torch.Tensor], norm_type: float = 2) -> float:
    """The ``norm_type`` norm of all the gradients of ``parameters`` together (those without a
    gradient left out; 0.0 when none has one), as a float."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, float(norm_type)).item()


def reduce_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over all ranks (a new tensor); without a process group, ``tensor`` itself."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    return all_reduce_sum(tensor) / dist.get_world_size()
