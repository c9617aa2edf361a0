"""What every training script here shares (classification, detection, segmentation): the common
command-line flags, run set-up, mixed precision, the non-finite-loss stop, and the exit-code
convention (bad input: one line on stderr and exit 2; non-finite loss: exit 3)."""
from __future__ import annotations

import argparse
import atexit
import logging
import multiprocessing
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from yacs.config import CfgNode

from config import UserError, get_config
from utils import DistInfo, init_distributed, load_checkpoint_file, newest_loadable_checkpoint, seed_everything


# '' is the official config.py's placeholder, which the official main.py always replaces by its
# --amp-opt-level default 'native'; here it means the same.
AMP_OPT_LEVELS = ("", "native", "O0", "O1", "O2")
AMP_DTYPES = ("auto", "bfloat16", "float16")
CONFIG_FILE = "config.yaml"


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
    parser.add_argument("--amp-opt-level", type=str, choices=AMP_OPT_LEVELS[1:],
                        help="O0: no mixed precision; native (default), O1, O2: native mixed precision "
                             "(apex is not used)")
    parser.add_argument("--amp-dtype", type=str, choices=AMP_DTYPES,
                        help="mixed-precision type; auto (default): bfloat16 where the device runs it fast, "
                             "float16 on older CUDA GPUs, else float32")
    parser.add_argument("--output", default="output", type=str, metavar="PATH",
                        help="root of output folders: <output>/<model name>/<tag>")
    parser.add_argument("--tag", help="tag of experiment")
    parser.add_argument("--eval", action="store_true", help="only evaluate")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--device", type=str, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (the first batches compile; --eval/--throughput: one graph for every input size)")
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
    """Join the process group (if launched), create the run folder, write its ``config.yaml``,
    share the CPUs out (data-loading workers, torch threads), seed, set cuDNN flags."""
    dist_info = init_distributed(config.DEVICE)
    prepare_output(config.OUTPUT)
    if dist_info.is_main:
        write_run_config(config)
    limit_cpu_use(config, dist_info)
    seed_everything(config.SEED + dist_info.rank)
    torch.backends.cudnn.benchmark = not config.DETERMINISTIC
    if config.DETERMINISTIC:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return dist_info


def write_run_config(config: CfgNode) -> None:
    """``config.yaml`` in the run folder: the config as asked for (file, --opts, flags), written
    before any value is derived from it (scaled learning rates, capped worker counts), so
    passing it back as ``--cfg`` reproduces the run."""
    with open(os.path.join(config.OUTPUT, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(config.dump())


def cpu_plan(num_workers: int, processes_here: int, cpus: int) -> tuple[int, int]:
    """``(data-loading workers, torch threads)`` per process so that the processes on this
    machine, their workers and their threads together use no more than ``cpus`` cores (when
    there are at least as many cores as processes): each process gets an equal share, keeps one
    core of it for itself, gives at most ``num_workers`` of the rest to its workers, and torch
    computes on what the workers leave. More busy threads than cores make torch's OpenMP
    threads wait on each other: a neighbour process then slows a run many times over."""
    share = max(1, cpus // max(1, processes_here))
    workers = max(0, min(num_workers, share - 1))
    return workers, share - workers


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def limit_cpu_use(config: CfgNode, dist_info: DistInfo) -> None:
    """Apply ``cpu_plan``: cap DATA.NUM_WORKERS (none for --throughput), and set torch's thread count unless the user
    chose one through OMP_NUM_THREADS (torchrun sets it to 1 for several processes)."""
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", dist_info.world_size))
    asked = config.DATA.NUM_WORKERS if "DATA" in config and "NUM_WORKERS" in config.DATA else 0
    # --throughput reads one batch: every core computes
    workers, threads = cpu_plan(0 if config.get("THROUGHPUT_MODE", False) else asked, processes_here,
                                available_cpus())
    if workers != asked:
        frozen = config.is_frozen()
        config.defrost()
        config.DATA.NUM_WORKERS = workers
        if frozen:
            config.freeze()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)


def launch(job: Callable[[], None]) -> int:
    """Run ``job`` and return the exit code: 0, 2 for a UserError (one line on stderr), 3 for a
    non-finite loss, 130 for Ctrl-C outside training. The process group, if any, is torn down
    either way."""
    try:
        job()
        code = 0
    except (UserError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2 if isinstance(err, UserError) else 3
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which stops at a step instead)
        print("interrupted; relaunch the same command to resume from the newest checkpoint", file=sys.stderr)
        code = 130
    if dist.is_available() and dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    return code


def run_configured(args: argparse.Namespace, main: Callable[..., None], *extra) -> int:
    """``launch`` the usual job of a training or test script: the config from the parsed ``args``,
    the run set up, then ``main(config, dist_info, *extra)``; returns the exit code."""

    def job() -> None:
        config = get_config(args)
        main(config, setup_run(config), *extra)

    return launch(job)


@dataclass(frozen=True)
class DeviceFeatures:
    """What AMP_DTYPE auto decides on: a GPU's CUDA compute capability, or whether a CPU has
    bfloat16 matrix instructions (AMX tiles, avx512_bf16) and float16 ones (AMX-FP16)."""
    cuda_capability: tuple[int, int] | None = None
    amx: bool = False
    avx512_bf16: bool = False
    amx_fp16: bool = False


def _cpu_has(probe: str) -> bool:
    """One of torch's private CPU feature probes (``torch.cpu._is_*_supported``); False where this
    torch is too old to have it."""
    return bool(getattr(torch.cpu, probe, lambda: False)())


def probe_device(device: torch.device) -> DeviceFeatures:
    """The features of ``device`` that decide AMP_DTYPE auto (the one place that asks the hardware)."""
    if device.type == "cuda":
        return DeviceFeatures(cuda_capability=torch.cuda.get_device_capability(device))
    if device.type == "cpu":
        return DeviceFeatures(amx=_cpu_has("_is_amx_tile_supported"), avx512_bf16=_cpu_has("_is_avx512_bf16_supported"),
                              amx_fp16=_cpu_has("_is_amx_fp16_supported"))
    return DeviceFeatures()


def auto_dtype(device_type: str, features: DeviceFeatures) -> tuple[torch.dtype, str]:
    """AMP_DTYPE auto: bfloat16 where the hardware multiplies it fast (CUDA compute capability
    >= 8.0, CPUs with AMX or avx512_bf16), float16 on older CUDA GPUs, else float32 (no
    autocast); with the reason, for the log."""
    if device_type == "cuda":
        major, minor = features.cuda_capability
        if major >= 8:
            return torch.bfloat16, f"CUDA compute capability {major}.{minor}"
        return torch.float16, f"CUDA compute capability {major}.{minor} has no fast bfloat16"
    if device_type == "cpu":
        found = [name for name, has in (("AMX", features.amx), ("avx512_bf16", features.avx512_bf16)) if has]
        if found:
            return torch.bfloat16, f"CPU has {' and '.join(found)}"
        return torch.float32, "CPU has neither AMX nor avx512_bf16"
    return torch.float32, f"no fast mixed precision known for {device_type} devices"


class Precision:
    """Autocast settings: AMP_OPT_LEVEL O0 is float32; otherwise autocast to AMP_DTYPE, where
    ``auto`` picks what this device runs fastest (see ``auto_dtype``). float16 gets a gradient
    scaler. ``str()`` says what was chosen and why."""

    def __init__(self, config: CfgNode, device: torch.device):
        if config.AMP_OPT_LEVEL not in AMP_OPT_LEVELS:
            raise UserError(f"AMP_OPT_LEVEL must be one of {', '.join(map(repr, AMP_OPT_LEVELS))}, "
                            f"got {config.AMP_OPT_LEVEL!r}")
        if config.AMP_DTYPE not in AMP_DTYPES:
            raise UserError(f"AMP_DTYPE must be one of {', '.join(AMP_DTYPES)}, got {config.AMP_DTYPE!r}")
        self.device_type = device.type
        if config.AMP_OPT_LEVEL == "O0":
            self.dtype, self.reason = torch.float32, "AMP_OPT_LEVEL O0"
        elif config.AMP_DTYPE == "auto":
            self.dtype, why = auto_dtype(device.type, probe_device(device))
            self.reason = f"AMP_DTYPE auto: {why}"
        else:
            self.dtype, self.reason = getattr(torch, config.AMP_DTYPE), f"AMP_DTYPE {config.AMP_DTYPE}"
            if self.dtype == torch.float16 and device.type == "cpu" and not probe_device(device).amx_fp16:
                self.reason += "; slow on a CPU without AMX-FP16"
                warnings.warn("AMP_DTYPE float16: float16 autocast is slow on a CPU without AMX-FP16; "
                              "AMP_DTYPE auto or bfloat16 is faster")
        self.enabled = self.dtype != torch.float32
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def __str__(self) -> str:
        chosen = str(self.dtype).replace("torch.", "")
        if self.enabled:
            chosen = f"autocast {chosen}" + (" with gradient scaler" if self.dtype == torch.float16 else "")
        return f"{chosen} ({self.reason})"


def compile_model(model: torch.nn.Module, backend: str = "inductor", any_size: bool = True) -> None:
    """``torch.compile`` the forward of ``model`` in place (COMPILE, ``--compile``): the module,
    its state_dict keys and checkpoints stay those of the eager model. Call it after copying the
    model (EMA), which would otherwise share the compiled forward.

    ``any_size`` (for evaluation and throughput): sizes are symbolic from the first call, and this
    process traces them size-obliviously (``backed_size_oblivious``: no graph specialised on a stage
    map that holds a single group) and without duck sizing (no graph for square inputs only), so a
    new input size reuses the graph. Otherwise (training) torch's default: static sizes first, and
    a size that changes becomes symbolic. Training needs that: in torch 2.14 inductor fails on the
    backward of a graph with a symbolic height and width."""
    if any_size:
        torch.fx.experimental._config.backed_size_oblivious = True
        torch.fx.experimental._config.use_duck_shape = False
    model.compile(dynamic=True if any_size else None, backend=backend)


def check_finite(bad_step: torch.Tensor, where: str) -> None:
    """Stop at the first step whose loss was not finite (``bad_step`` >= 0); ``where`` names the
    epoch or iteration."""
    step = int(bad_step.item())
    if step >= 0:
        raise NonFiniteLossError(f"loss is not finite at {where} step {step}; stopping without saving "
                                 "(the last checkpoint is kept)")


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


def checkpoint_to_resume(config: CfgNode, logger: logging.Logger) -> tuple[str, dict] | None:
    """``(path, checkpoint)`` to continue from: with TRAIN.AUTO_RESUME (not in eval mode) the newest
    loadable epoch checkpoint of OUTPUT, which wins over MODEL.RESUME; else MODEL.RESUME, if set."""
    if config.TRAIN.AUTO_RESUME and not config.EVAL_MODE:
        found = newest_loadable_checkpoint(config.OUTPUT, logger, config.TRUST_CHECKPOINTS)
        if found:
            if config.MODEL.RESUME and config.MODEL.RESUME != found[0]:
                logger.warning(f"auto-resume: using {found[0]} (newer than --resume {config.MODEL.RESUME})")
            return found
    if config.MODEL.RESUME:
        return config.MODEL.RESUME, load_checkpoint_file(config.MODEL.RESUME, config.TRUST_CHECKPOINTS)
    return None
