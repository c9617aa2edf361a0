"""What a step checkpoint costs: seconds to write (and to read back) the full training state of a
model with its AdamW state, as the run core saves it (crash-safe: temporary file, fsync, rename).

    python benchmarks/step_checkpoint.py [--cfg configs/crossformer/tiny_patch4_group7_224.yaml]
        [--ema] [--repeats 5] [--dir FOLDER]

The optimizer state is filled by one AdamW step on random gradients (no forward pass needed).
--dir picks the disk that is measured (default: a temporary folder).
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from timm.utils import ModelEmaV3  # noqa: E402

from config import load_config  # noqa: E402
from lr_scheduler import build_scheduler  # noqa: E402
from models import build_model  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from runtime import Precision  # noqa: E402
from training import BestModel, EpochSchedule, TrainingRun  # noqa: E402
from utils import DistInfo, load_checkpoint_file, step_checkpoint_path, write_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", default=os.path.join(ROOT, "configs", "crossformer", "tiny_patch4_group7_224.yaml"))
    parser.add_argument("--ema", action="store_true", help="include MODEL_EMA weights")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="", help="folder to write into (default: a temporary folder)")
    args = parser.parse_args()

    config = load_config(args.cfg, ["DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, 1000)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    ema = ModelEmaV3(model, decay=config.MODEL_EMA_DECAY) if args.ema else None
    precision = Precision(config, torch.device("cpu"))
    schedule = EpochSchedule(config, 2000)
    run = TrainingRun(config, DistInfo(0, 1, 0, torch.device("cpu")), logging.getLogger("benchmark"), schedule, model,
                      optimizer, precision, scheduler.step_update, BestModel("acc1", "max_accuracy", "max_accuracy", "", str),
                      scheduler, ema)

    with tempfile.TemporaryDirectory(dir=args.dir or None) as folder:
        path = step_checkpoint_path(folder, 3, 1234)
        save_times, load_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            state = run.checkpoint({**schedule.step_entries(3 * 2000 + 1234, False),
                                    "epoch_sums": {"loss_sum": 0.0, "grad_norm_sum": 0.0}})
            write_checkpoint(state, path)
            save_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            load_checkpoint_file(path)
            load_times.append(time.perf_counter() - start)
        size = os.path.getsize(path) / 2 ** 20
    print(f"{config.MODEL.NAME}{' + EMA' if ema else ''}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"parameters, step checkpoint {size:.0f} MiB; save median {statistics.median(save_times):.2f} s "
          f"(min {min(save_times):.2f}), load median {statistics.median(load_times):.2f} s over {args.repeats} repeats")


if __name__ == "__main__":
    main()
