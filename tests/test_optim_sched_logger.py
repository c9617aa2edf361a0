"""optimizer.py, lr_scheduler.py and logger.py: parameter groups, LR curves, log files."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn

from config import UserError, get_default_config
from logger import JsonLinesWriter, NullScalarWriter, create_logger, create_scalar_writer
from lr_scheduler import build_scheduler
from optimizer import build_optimizer

BASE_LR, WARMUP_LR, MIN_LR = 1e-3, 1e-6, 1e-5
EPOCHS, WARMUP_EPOCHS, ITERS = 10, 2, 7
TOTAL, WARMUP = EPOCHS * ITERS, WARMUP_EPOCHS * ITERS


class ToyModel(nn.Module):
    """Linear + LayerNorm, a position embedding and a 'rel_pos' table excluded from decay."""

    def __init__(self) -> None:
        super().__init__()
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.rel_pos_table = nn.Parameter(torch.zeros(5, 2))
        self.head = nn.Linear(8, 3)
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)

    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"}

    def no_weight_decay_keywords(self) -> set[str]:
        return {"rel_pos"}


def make_config(**train_keys):
    """Defaults with the test LRs/epochs and ``train_keys`` ('OPTIMIZER.NAME'=...) under TRAIN."""
    config = get_default_config()
    config.TRAIN.BASE_LR, config.TRAIN.WARMUP_LR, config.TRAIN.MIN_LR = BASE_LR, WARMUP_LR, MIN_LR
    config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS = EPOCHS, WARMUP_EPOCHS
    for key, value in train_keys.items():
        node = config.TRAIN
        *parents, leaf = key.split("__")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    config.freeze()
    return config


def group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[set[str]]:
    names = {id(param): name for name, param in model.named_parameters()}
    return [{names[id(param)] for param in group["params"]} for group in optimizer.param_groups]


def lr_curve(scheduler_name: str, **train_keys) -> list[float]:
    """The LR of every update 0 .. TOTAL-1, as main.py steps it."""
    config = make_config(LR_SCHEDULER__NAME=scheduler_name, **train_keys)
    optimizer = build_optimizer(config, ToyModel())
    scheduler = build_scheduler(config, optimizer, ITERS)
    lrs = []
    for update in range(TOTAL):
        scheduler.step_update(update)
        lrs.append(optimizer.param_groups[0]["lr"])
        assert all(group["lr"] == lrs[-1] for group in optimizer.param_groups)
    return lrs


# ----------------------------------------------------------------------------- optimizer

def test_weight_decay_groups():
    model = ToyModel()
    optimizer = build_optimizer(make_config(WEIGHT_DECAY=0.05), model)
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, not_decayed = group_names(model, optimizer)
    assert decayed == {"fc.weight", "head.weight"}
    assert not_decayed == {"absolute_pos_embed", "rel_pos_table", "fc.bias", "norm.weight",
                           "norm.bias", "head.bias"}
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.0]
    group = optimizer.param_groups[0]
    assert group["lr"] == BASE_LR and group["eps"] == 1e-8 and group["betas"] == (0.9, 0.999)


def test_model_without_skip_methods():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    decayed, not_decayed = group_names(model, build_optimizer(make_config(), model))
    assert decayed == {"0.weight"}
    assert not_decayed == {"0.bias", "1.weight", "1.bias"}


def test_sgd_settings_and_case_insensitive_name():
    config = make_config(OPTIMIZER__NAME="SGD", OPTIMIZER__MOMENTUM=0.8, WEIGHT_DECAY=1e-4)
    optimizer = build_optimizer(config, ToyModel())
    assert isinstance(optimizer, torch.optim.SGD)
    for group, decay in zip(optimizer.param_groups, [1e-4, 0.0]):
        assert (group["lr"], group["momentum"], group["nesterov"]) == (BASE_LR, 0.8, True)
        assert group["weight_decay"] == decay


def test_unknown_optimizer_is_a_user_error():
    with pytest.raises(UserError, match=r"TRAIN\.OPTIMIZER\.NAME.*'lamb'.*adamw, sgd"):
        build_optimizer(make_config(OPTIMIZER__NAME="lamb"), ToyModel())


# ----------------------------------------------------------------------------- scheduler

@pytest.mark.parametrize("name", ["cosine", "linear", "step"])
def test_warmup_is_linear_from_warmup_lr_to_base_lr(name):
    lrs = lr_curve(name)
    assert lrs[0] == WARMUP_LR
    assert lrs[WARMUP] == pytest.approx(BASE_LR, rel=1e-12)
    for step in range(WARMUP):
        assert lrs[step] == pytest.approx(WARMUP_LR + (BASE_LR - WARMUP_LR) * step / WARMUP,
                                          rel=1e-12)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_decay_reaches_min_lr_at_last_step(name):
    lrs = lr_curve(name)
    assert lrs[-1] == pytest.approx(MIN_LR, rel=1e-12)
    assert lrs[-2] > MIN_LR
    after_warmup = lrs[WARMUP:]
    assert all(a > b for a, b in zip(after_warmup, after_warmup[1:]))


def test_cosine_shape():
    lrs = lr_curve("cosine")
    decay_steps = TOTAL - 1 - WARMUP
    for step in range(WARMUP, TOTAL):
        progress = (step - WARMUP) / decay_steps
        expected = MIN_LR + 0.5 * (BASE_LR - MIN_LR) * (1 + math.cos(math.pi * progress))
        assert lrs[step] == pytest.approx(expected, rel=1e-12)


def test_linear_is_linear():
    lrs = lr_curve("linear", EPOCHS=10, WARMUP_EPOCHS=1)  # decay over 62 steps: midpoint at 7 + 31
    decay_steps = TOTAL - 1 - ITERS
    assert lrs[ITERS + decay_steps // 2] == pytest.approx((BASE_LR + MIN_LR) / 2, rel=1e-12)
    steps = [b - a for a, b in zip(lrs[ITERS:], lrs[ITERS + 1:])]
    assert steps == pytest.approx([steps[0]] * len(steps), rel=1e-9)


def test_step_decays_at_decay_epochs():
    lrs = lr_curve("step", LR_SCHEDULER__DECAY_EPOCHS=4, LR_SCHEDULER__DECAY_RATE=0.5)
    for epoch in range(WARMUP_EPOCHS, EPOCHS):
        expected = BASE_LR * 0.5 ** (epoch // 4)
        epoch_lrs = lrs[epoch * ITERS:(epoch + 1) * ITERS]
        assert epoch_lrs == pytest.approx([expected] * ITERS, rel=1e-12)
    assert lrs[4 * ITERS - 1] == BASE_LR and lrs[4 * ITERS] == BASE_LR * 0.5


def test_no_warmup_starts_at_base_lr():
    assert lr_curve("cosine", WARMUP_EPOCHS=0)[0] == BASE_LR


def test_scheduler_bad_values_are_user_errors():
    optimizer = build_optimizer(make_config(), ToyModel())
    with pytest.raises(UserError, match=r"TRAIN\.LR_SCHEDULER\.NAME.*cosine, linear, step"):
        build_scheduler(make_config(LR_SCHEDULER__NAME="plateau"), optimizer, ITERS)
    with pytest.raises(UserError, match=r"TRAIN\.LR_SCHEDULER\.DECAY_EPOCHS"):
        build_scheduler(make_config(LR_SCHEDULER__NAME="step", LR_SCHEDULER__DECAY_EPOCHS=0),
                        optimizer, ITERS)


@pytest.mark.parametrize("name", ["cosine", "linear", "step"])
def test_state_dict_round_trip(name):
    config = make_config(LR_SCHEDULER__NAME=name)
    optimizer = build_optimizer(config, ToyModel())
    scheduler = build_scheduler(config, optimizer, ITERS)
    resume_at = 3 * ITERS + 2
    scheduler.step_update(resume_at)
    saved = scheduler.state_dict()
    expected = [optimizer.param_groups[0]["lr"]]
    scheduler.step_update(resume_at + 1)
    expected.append(optimizer.param_groups[0]["lr"])

    fresh_optimizer = build_optimizer(config, ToyModel())
    restored = build_scheduler(config, fresh_optimizer, ITERS)
    restored.load_state_dict(saved)
    got = []
    for update in (resume_at, resume_at + 1):
        restored.step_update(update)
        got.append(fresh_optimizer.param_groups[0]["lr"])
    assert got == expected
    assert "optimizer" not in saved


# ----------------------------------------------------------------------------- logger

@pytest.fixture
def close_loggers():
    """Close the file handlers the test opened."""
    created = []
    yield created
    for logger in created:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()


def test_logger_files_append_and_console_only_on_rank0(tmp_path, capsys, close_loggers):
    for run in ("first", "second"):
        for rank in (0, 1):
            logger = create_logger(str(tmp_path), dist_rank=rank, name=f"rank{rank}")
            close_loggers.append(logger)
            logger.info("%s run on rank %d", run, rank)
            logger.debug("debug goes to the file only")
    out = capsys.readouterr().out
    assert "first run on rank 0" in out and "second run on rank 0" in out
    assert "rank 1" not in out and "debug goes" not in out

    for rank in (0, 1):
        lines = (tmp_path / f"log_rank{rank}.txt").read_text().splitlines()
        assert len(lines) == 4
        assert lines[0].endswith(f"INFO first run on rank {rank}")
        assert lines[2].endswith(f"INFO second run on rank {rank}")
        assert f"crossformer.rank{rank}]" in lines[0] and "test_optim_sched_logger.py" in lines[0]
        assert "\x1b[" not in lines[0]


def test_logger_recreated_for_another_dir_drops_old_handlers(tmp_path, close_loggers):
    first = create_logger(str(tmp_path / "a"), dist_rank=1)
    second = create_logger(str(tmp_path / "b"), dist_rank=1)
    close_loggers.append(second)
    assert first is second and first.name == "crossformer"
    assert len(second.handlers) == 1 and not second.propagate and second.level == logging.DEBUG
    second.info("only in b")
    assert (tmp_path / "a" / "log_rank1.txt").read_text() == ""
    assert "only in b" in (tmp_path / "b" / "log_rank1.txt").read_text()


def test_metrics_jsonl(tmp_path):
    writer = JsonLinesWriter(str(tmp_path / "run"))
    writer.write({"epoch": 0, "loss": torch.tensor(1.5), "acc1": 12.5})
    writer.write({"epoch": 1, "loss": 0.75, "acc1": 25.0})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"epoch": 0, "loss": 1.5, "acc1": 12.5}, {"epoch": 1, "loss": 0.75, "acc1": 25.0}]

    JsonLinesWriter(str(tmp_path / "other"), dist_rank=1).write({"epoch": 0})
    assert not (tmp_path / "other").exists()


def test_scalar_writer(tmp_path):
    disabled = create_scalar_writer(str(tmp_path), enabled=False)
    assert isinstance(disabled, NullScalarWriter)
    disabled.add_scalar("train/loss", 1.0, 0)
    disabled.close()
    assert not (tmp_path / "tensorboard").exists()

    writer = create_scalar_writer(str(tmp_path), enabled=True)
    writer.add_scalar("train/loss", 1.0, 0)
    writer.close()
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert isinstance(writer, NullScalarWriter)
    else:
        assert any((tmp_path / "tensorboard").iterdir())
