"""Run logs: a text log per rank, per-epoch metrics as JSON lines, optional TensorBoard scalars."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Protocol

from termcolor import colored

FILE_FORMAT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
METRICS_FILE = "metrics.jsonl"
# ``extra=FILE_ONLY``: a record for the log files only, e.g. an error line already on stderr
FILE_ONLY = {"file_only": True}

_logger = logging.getLogger(f"crossformer.{__name__}")  # reaches the run log


def create_logger(output_dir: str, dist_rank: int = 0, name: str = "") -> logging.Logger:
    """Logger ``crossformer[.name]`` writing to ``output_dir/log_rank{dist_rank}.txt`` (appended).

    Rank 0 also prints INFO and above to stdout, except records logged with ``extra=FILE_ONLY``.
    Calling again replaces (and closes) the handlers of an earlier call with the same name.
    """
    os.makedirs(output_dir, exist_ok=True)
    logger = logging.getLogger(f"crossformer.{name}" if name else "crossformer")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    close_logger(name)

    if dist_rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.INFO)
        prefix = colored("[%(asctime)s %(name)s]", "green") + " " + colored(
            "(%(filename)s %(lineno)d)", "yellow")
        console.setFormatter(logging.Formatter(prefix + ": %(levelname)s %(message)s",
                                               datefmt=DATE_FORMAT))
        console.addFilter(lambda record: not getattr(record, "file_only", False))
        logger.addHandler(console)

    log_file = logging.FileHandler(os.path.join(output_dir, f"log_rank{dist_rank}.txt"),
                                   mode="a", encoding="utf-8")
    log_file.setLevel(logging.DEBUG)
    log_file.setFormatter(logging.Formatter(FILE_FORMAT, datefmt=DATE_FORMAT))
    logger.addHandler(log_file)
    return logger


def close_logger(name: str = "") -> None:
    """Close and remove the handlers of ``create_logger(..., name)``: the run's log files are
    closed, and nothing more is written to them."""
    logger = logging.getLogger(f"crossformer.{name}" if name else "crossformer")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def _json_scalar(value: Any) -> Any:
    """Tensors and numpy numbers with one element as plain Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


class JsonLinesWriter:
    """Appends one JSON object per line to ``output_dir/metrics.jsonl``; other ranks do nothing."""

    def __init__(self, output_dir: str, dist_rank: int = 0) -> None:
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.enabled = dist_rank == 0
        if self.enabled:
            os.makedirs(output_dir, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (e.g. one epoch's metrics) as one line; the file is closed after it."""
        if not self.enabled:
            return
        line = json.dumps(record, default=_json_scalar)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def keep_before(self, key: str, value: float) -> None:
        """Drop the records whose ``key`` is ``value`` or more (say, the epochs a resumed run
        trains again, so each appears once), and any line a kill cut short. The file is
        rewritten to a temporary file and renamed into place."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        kept = [record for record in read_metrics(os.path.dirname(self.path)) if key not in record or record[key] < value]
        if len(kept) == len(lines):
            return
        temporary = f"{self.path}.tmp{os.getpid()}"
        with open(temporary, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in kept)
        os.replace(temporary, self.path)


def read_metrics(output_dir: str) -> list[dict[str, Any]]:
    """The records of ``output_dir/metrics.jsonl`` (empty when there is none); a line cut off by
    a kill is skipped."""
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class ScalarWriter(Protocol):
    """The part of TensorBoard's SummaryWriter the training loop uses."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None: ...

    def close(self) -> None: ...


class NullScalarWriter:
    """A ScalarWriter that drops everything (TensorBoard off, missing, or not rank 0)."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None:
        """Ignore the scalar."""

    def close(self) -> None:
        """Nothing to close."""


def create_scalar_writer(output_dir: str, enabled: bool, purge_step: int | None = None) -> ScalarWriter:
    """TensorBoard writer for ``output_dir/tensorboard`` when enabled and installed, else a no-op.
    A resumed run passes ``purge_step`` (the first step it trains again): TensorBoard then hides
    what the earlier run logged from that step on, so no step shows twice."""
    if not enabled:
        return NullScalarWriter()
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        _logger.info("tensorboard is not installed: no TensorBoard scalars are written")
        return NullScalarWriter()
    return SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"), purge_step=purge_step)
