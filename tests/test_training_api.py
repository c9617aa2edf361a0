"""The authors' training API in main.py (API.md, "Training APIs"): parse_option() -> (args, config),
main(args, config) in a process group the caller initialised, train_one_epoch with timm's
NativeScaler, validate (with CrossFormer++'s epoch argument) and throughput.

The flow test runs API.md's "Complete Training Example" as written, adapted only in paths, sizes
and backend (gloo on the CPU, no torch.cuda.set_device): it trains, validates and saves, a second
launch auto-resumes, and a third evaluates the saved checkpoint to the accuracy it was saved with.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from timm.utils import NativeScaler
from torch import nn

import main
from config import load_config
from conftest import ROOT, training_environment
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer

DEMO = os.path.join(ROOT, "configs", "demo", "digits.yaml")
FAKE = ["--opts", "DATA.DATASET", "fake", "DATA.FAKE_SIZE", "64", "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "1"]

# API.md's example; changes: the repository path on sys.path, the gloo backend, no torch.cuda.set_device
EXAMPLE = '''\
#!/usr/bin/env python3

import os
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
from main import main, parse_option

def train_crossformer():
    # Parse arguments
    args, config = parse_option()

    # Setup distributed training
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        rank = int(os.environ["RANK"])
        world_size = int(os.environ['WORLD_SIZE'])
    else:
        rank = -1
        world_size = -1

    torch.distributed.init_process_group(
        backend='gloo',
        init_method='env://',
        world_size=world_size,
        rank=rank
    )

    # Start training
    main(args, config)

if __name__ == '__main__':
    train_crossformer()
'''


def test_the_complete_training_example_trains_resumes_and_reloads(tmp_path):
    script = tmp_path / "train_example.py"
    script.write_text(EXAMPLE.format(root=ROOT))
    output = tmp_path / "output"
    run_dir = output / "cros_demo_digits" / "default"

    def launch(*extra):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                                 str(script), "--cfg", DEMO, "--output", str(output), "--batch-size", "16",
                                 "--num_workers", "0", *extra, *FAKE], cwd=ROOT, capture_output=True, text=True,
                                timeout=300, env=training_environment())
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    first = launch("--epochs", "1")
    # the learning rates are scaled once, for the global batch of 16: 8e-3 x 16 / 512
    assert "learning rates for a global batch of 16: base 2.5000e-04, warmup 2.5000e-07, min 2.5000e-06" in first
    assert re.search(r" \* Acc@1 \d+\.\d+ Acc@5", first) and (run_dir / "ckpt_epoch_0.pth").is_file()
    second = launch("--epochs", "2")
    assert "resuming training at epoch 1" in second and "Train: [0/2]" not in second
    saved = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert saved["epoch"] == 1
    evaluated = launch("--eval", "--resume", str(run_dir / "ckpt_epoch_1.pth"))
    top1, top5 = map(float, re.search(r" \* Acc@1 (\S+) Acc@5 (\S+)", evaluated).groups())
    assert (top1, top5) == (round(saved["acc1"], 3), round(saved["acc5"], 3))


def test_parse_option_gives_the_flags_and_the_config(tmp_path, capsys):
    args, config = main.parse_option(["--cfg", DEMO, "--batch-size", "16", "--output", str(tmp_path), "--epochs", "3"])
    assert args.batch_size == 16 and config.DATA.BATCH_SIZE == 16 and config.TRAIN.EPOCHS == 3 and config.is_frozen()
    with pytest.raises(SystemExit) as stopped:
        main.parse_option(["--cfg", DEMO, "--opts", "TRAIN.NOT_A_KEY", "1"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "TRAIN.NOT_A_KEY" in err and "\n" not in err


def small_setup(seed=0):
    config = load_config(DEMO, ["MODEL.DROP_PATH_RATE", 0.0, "TRAIN.WARMUP_EPOCHS", 0, "PRINT_FREQ", 1000,
                                "AUG.MIXUP", 0.0, "AUG.CUTMIX", 0.0])
    torch.manual_seed(seed)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    generator = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,), generator=generator))
               for _ in range(3)]
    return config, model, optimizer, build_scheduler(config, optimizer, len(batches)), batches


@pytest.mark.usefixtures("one_thread")
def test_train_one_epoch_uses_the_native_scaler_it_is_given():
    """timm's NativeScaler scales the loss by 2^16 and unscales the gradients: exact in float32,
    so the weights equal those of a run without scaling; its state follows every step."""
    weights = []
    for scaler in (None, NativeScaler(device="cpu")):
        config, model, optimizer, scheduler, batches = small_setup()
        loss = main.train_one_epoch(config, model, nn.CrossEntropyLoss(), batches, optimizer, 0, None, scheduler, scaler)
        assert math.isfinite(loss) and loss > 0
        weights.append(model.state_dict())
    assert scaler.state_dict()["_growth_tracker"] == 3  # three unskipped steps counted towards growth
    for key, value in weights[0].items():
        assert torch.equal(weights[1][key], value), key


@pytest.mark.usefixtures("one_thread")
def test_validate_and_throughput_with_the_authors_signatures(caplog):
    config, model, _, _, batches = small_setup()
    acc1, acc5, loss = main.validate(config, batches, model)
    assert 0 <= acc1 <= acc5 <= 100 and loss > 0
    assert main.validate(config, batches, model, 7) == (acc1, acc5, loss)  # CrossFormer++'s epoch argument
    logger = logging.getLogger("api_test")
    caplog.set_level("INFO", logger="api_test")
    assert main.throughput(batches, model, logger) > 0
    assert re.fullmatch(r"batch_size 4 throughput \d+\.\d images/s", caplog.messages[-1])
