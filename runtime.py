"""What every script here shares at the process level (training, evaluation, prediction):
the common command-line flags, run set-up (process group, run folder, config.yaml, log, CPU
plan, seeds), mixed precision, torch.compile, and the exit-code convention (bad input: one line
on stderr and exit 2; non-finite loss: exit 3). The training loop they share is training.py."""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from yacs.config import CfgNode

from config import UserError, get_config
from logger import FILE_ONLY, close_logger, create_logger
from utils import DistInfo, init_distributed, seed_everything


# '' is the official config.py's placeholder, which the official main.py always replaces by its
# --amp-opt-level default 'native'; here it means the same.
AMP_OPT_LEVELS = ("", "native", "O0", "O1", "O2")
AMP_DTYPES = ("auto", "bfloat16", "float16")
CONFIG_FILE = "config.yaml"
LOAD_SECONDS = 0.25  # how long the CPU load of other processes is measured at start-up
BUSY_CORE_FRACTION = 0.3  # a core busy this much of the time counts as taken: torch's threads would wait on it


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


def setup_run(config: CfgNode) -> tuple[DistInfo, logging.Logger]:
    """Join the process group (if launched, or if the caller made one), create the run folder,
    write its ``config.yaml``, start the log, share the CPUs out (data-loading workers, torch
    threads), seed, set cuDNN flags. Returns this process's place and the run's logger."""
    dist_info = init_distributed(config.DEVICE)
    prepare_output(config.OUTPUT)
    if dist_info.is_main:
        write_run_config(config)
    logger = create_logger(config.OUTPUT, dist_info.rank)
    logger.info(f"world size {dist_info.world_size}, device {dist_info.device}, output {config.OUTPUT}")
    logger.info(limit_cpu_use(config, dist_info))
    seed_everything(config.SEED + dist_info.rank)
    torch.backends.cudnn.benchmark = not config.DETERMINISTIC
    if config.DETERMINISTIC:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return dist_info, logger


def write_run_config(config: CfgNode) -> None:
    """``config.yaml`` in the run folder: the config as asked for (file, --opts, flags), written
    before any value is derived from it (scaled learning rates, capped worker counts), so
    passing it back as ``--cfg`` reproduces the run. Nothing else writes it."""
    with open(os.path.join(config.OUTPUT, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(config.dump())


def cpu_plan(num_workers: int, processes_here: int, cpus: int, busy: int = 0) -> tuple[int, int]:
    """``(data-loading workers, torch threads)`` per process so that the processes on this
    machine, their workers and their threads together use no more than the ``cpus - busy`` cores
    that other work leaves free (at least one thread per process): each process gets an equal
    share, keeps one core of it for itself, gives at most ``num_workers`` of the rest to its
    workers, and torch computes on what the workers leave. More busy threads than free cores make
    torch's OpenMP threads wait on each other: one busy neighbour then slows a run many times over."""
    share = max(1, (cpus - busy) // max(1, processes_here))
    workers = max(0, min(num_workers, share - 1))
    return workers, share - workers


def available_cpus() -> set[int]:
    """The cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _cpu_times() -> dict[int, tuple[int, int]]:
    """``{cpu: (busy, total)}`` clock ticks since boot, from /proc/stat (empty where it is missing)."""
    times = {}
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit():
                    ticks = [int(field) for field in fields[:8]]  # user nice system idle iowait irq softirq steal
                    times[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    except OSError:
        pass
    return times


def busy_cores(cpus: set[int], seconds: float = LOAD_SECONDS, read: Callable[[], dict] = _cpu_times) -> float:
    """How many of ``cpus`` other work keeps busy, measured over ``seconds`` (this process sleeps
    meanwhile): the busy share of each core's time, summed. Unlike the load average, which lags
    by a minute, this sees a neighbour that has just started. 0 where /proc/stat is missing."""
    before = read()
    time.sleep(seconds)
    after = read()
    busy = 0.0
    for cpu in cpus & before.keys() & after.keys():
        total = after[cpu][1] - before[cpu][1]
        if total > 0:
            busy += (after[cpu][0] - before[cpu][0]) / total
    return busy


def limit_cpu_use(config: CfgNode, dist_info: DistInfo) -> str:
    """Apply ``cpu_plan`` to the cores left free by other work: cap DATA.NUM_WORKERS (none for
    --throughput), and set torch's thread count unless the user chose one through
    OMP_NUM_THREADS (torchrun sets it to 1 for several processes). Returns the log line saying
    what was chosen and why. The load is measured once, at start-up."""
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", dist_info.world_size))
    asked = config.DATA.NUM_WORKERS if "DATA" in config and "NUM_WORKERS" in config.DATA else 0
    cpus = available_cpus()
    load = busy_cores(cpus)
    busy = min(len(cpus), math.floor(load + 1 - BUSY_CORE_FRACTION))
    # --throughput reads one batch: every free core computes
    workers, threads = cpu_plan(0 if config.get("THROUGHPUT_MODE", False) else asked, processes_here, len(cpus), busy)
    if workers != asked:
        frozen = config.is_frozen()
        config.defrost()
        config.DATA.NUM_WORKERS = workers
        if frozen:
            config.freeze()
    if "OMP_NUM_THREADS" in os.environ:
        threads_text = f"{torch.get_num_threads()} torch threads (OMP_NUM_THREADS)"
    else:
        torch.set_num_threads(threads)
        threads_text = f"{threads} torch threads"
    return (f"CPU plan: {len(cpus)} cores, {load:.1f} busy with other work (measured over {LOAD_SECONDS} s), "
            f"{processes_here} training process(es) here; per process: {workers} data-loading workers "
            f"({asked} asked), {threads_text}")


def launch(job: Callable[[], None]) -> int:
    """Run ``job`` and return the exit code: 0, 2 for a UserError (one line on stderr), 3 for a
    non-finite loss, 130 for Ctrl-C outside training. The line goes to the run log too (when
    the run got as far as starting it), as does the traceback of an unexpected error, which is
    then raised on. A process group the job joined is torn down; one the caller made stays."""
    logger = logging.getLogger("crossformer")
    had_group = dist.is_available() and dist.is_initialized()
    try:
        job()
        code = 0
    except (UserError, NonFiniteLossError) as err:
        code = 2 if isinstance(err, UserError) else 3
        _report(logger, f"error: {err}")
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which stops at a step instead)
        code = 130
        _report(logger, "interrupted; relaunch the same command to resume from the newest checkpoint")
    except Exception:
        if logger.handlers:
            logger.exception("the run failed", extra=FILE_ONLY)
        close_logger()
        raise
    close_logger()
    if dist.is_available() and dist.is_initialized():
        if code == 0:
            dist.barrier()
        if not had_group:
            dist.destroy_process_group()
    return code


def _report(logger: logging.Logger, line: str) -> None:
    """``line`` on stderr and, if this run's log is open, in it."""
    print(line, file=sys.stderr)
    if logger.handlers:
        logger.error(line, extra=FILE_ONLY)


def run_configured(args: argparse.Namespace, main: Callable[..., None], *extra) -> int:
    """``launch`` the usual job of a training or test script, ``main(config, *extra)`` with the
    config from the parsed ``args`` (``main`` sets the run up); returns the exit code."""
    return launch(lambda: main(get_config(args), *extra))


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
    scaler, unless ``scaler`` is given (the authors' NativeScaler holds one: its state then goes on
    from call to call). ``str()`` says what was chosen and why."""

    def __init__(self, config: CfgNode, device: torch.device, scaler: torch.amp.GradScaler | None = None):
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
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(device.type,
                                                                            enabled=self.dtype == torch.float16)

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
