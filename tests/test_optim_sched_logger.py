"""optimizer.py, lr_scheduler.py and logger.py: parameter groups, fused AdamW on CUDA only, LR curves,
log files, metrics.jsonl after a replay."""
from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch
from torch import nn

from config import UserError, get_default_config, load_config
from conftest import DEMO_CFG, ROOT
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


def lr_curve(scheduler_name: str, steps: int = TOTAL, **train_keys) -> list[float]:
    """The LR of every update 0 .. steps-1, as main.py steps it."""
    config = make_config(LR_SCHEDULER__NAME=scheduler_name, **train_keys)
    optimizer = build_optimizer(config, ToyModel())
    scheduler = build_scheduler(config, optimizer, ITERS)
    lrs = []
    for update in range(steps):
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

def official_lr(name: str, step: int, total: int, warmup: int, decay_every: int = 0,
                decay_rate: float = 0.1) -> float:
    """The official code's rate at ``step``, written out from its definition: timm's cosine over all
    ``total`` steps (warm-up not a prefix), the linear decay to 1% of BASE_LR over the steps after
    the warm-up, and the step decay counted from step 0."""
    if step < warmup:
        return WARMUP_LR + step * (BASE_LR - WARMUP_LR) / warmup
    if name == "cosine":
        return MIN_LR if step >= total else MIN_LR + 0.5 * (BASE_LR - MIN_LR) * (1 + math.cos(math.pi * step / total))
    if name == "linear":
        return BASE_LR - (BASE_LR - 0.01 * BASE_LR) * min(1.0, (step - warmup) / (total - warmup))
    return BASE_LR * decay_rate ** (step // decay_every)


class ListLoader(list):
    """A list of batches standing in for a DataLoader."""


def trained_lrs(name: str, warmup_epochs: int, accumulation: int, batches: int = ITERS) -> tuple[list[float], int]:
    """Train a toy model for EPOCHS epochs through main.train_one_epoch and return the rate every
    optimizer step ran with, and the optimizer steps per epoch."""
    from main import train_one_epoch

    config = make_config(LR_SCHEDULER__NAME=name, WARMUP_EPOCHS=warmup_epochs, ACCUMULATION_STEPS=accumulation,
                         LR_SCHEDULER__DECAY_EPOCHS=3)
    config.defrost()
    config.AMP_OPT_LEVEL, config.PRINT_FREQ = "O0", 1000
    config.freeze()
    model = nn.Linear(4, 3)
    optimizer = build_optimizer(config, model)
    updates_per_epoch = batches // accumulation
    scheduler = build_scheduler(config, optimizer, updates_per_epoch)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    generator = torch.Generator().manual_seed(0)
    loader = ListLoader((torch.randn(2, 4, generator=generator), torch.tensor([0, 2])) for _ in range(batches))
    for epoch in range(EPOCHS):
        train_one_epoch(config, model, nn.CrossEntropyLoss(), loader, optimizer, epoch, None, scheduler, None)
    return seen, updates_per_epoch


@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("warmup_epochs", [0, WARMUP_EPOCHS])
@pytest.mark.parametrize("name", ["cosine", "linear", "step"])
def test_trainer_follows_the_official_schedule_at_every_step(name, warmup_epochs, accumulation):
    lrs, per_epoch = trained_lrs(name, warmup_epochs, accumulation)
    total, warmup = EPOCHS * per_epoch, warmup_epochs * per_epoch
    assert len(lrs) == total  # 7 batches with 3-step accumulation: 2 steps, the 7th batch left out
    expected = [official_lr(name, step, total, warmup, decay_every=3 * per_epoch) for step in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=0)


@pytest.mark.parametrize("warmup_epochs", [0, WARMUP_EPOCHS])
@pytest.mark.parametrize("name", ["cosine", "linear", "step"])
def test_schedule_equals_the_official_formula_up_to_the_end(name, warmup_epochs):
    """Step TOTAL is where main.py resumes a run whose last epoch is done."""
    lrs = lr_curve(name, WARMUP_EPOCHS=warmup_epochs, LR_SCHEDULER__DECAY_EPOCHS=4, LR_SCHEDULER__DECAY_RATE=0.5,
                   steps=TOTAL + 1)
    expected = [official_lr(name, step, TOTAL, warmup_epochs * ITERS, 4 * ITERS, 0.5) for step in range(TOTAL + 1)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=0)


def test_cosine_and_linear_end_where_the_official_code_ends():
    cosine, linear = lr_curve("cosine"), lr_curve("linear")
    assert MIN_LR < cosine[-1] < MIN_LR + 1e-3 * (BASE_LR - MIN_LR)  # never quite MIN_LR
    assert cosine[WARMUP] < BASE_LR  # the warm-up replaced the cosine's start: no plateau at BASE_LR
    assert linear[-1] == pytest.approx(BASE_LR * (0.01 + 0.99 / (TOTAL - WARMUP)), rel=1e-12)


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


# ----------------------------------------------------------------------------- fused AdamW on CUDA
def test_all_on_cuda_needs_every_parameter_there():
    from types import SimpleNamespace

    from optimizer import all_on_cuda

    cuda, cpu = SimpleNamespace(device=torch.device("cuda", 0)), torch.nn.Parameter(torch.zeros(1))
    assert all_on_cuda([{"params": [cuda]}, {"params": [cuda]}])
    assert not all_on_cuda([{"params": [cuda]}, {"params": [cpu]}])
    assert not all_on_cuda([{"params": [cpu]}])
    assert not all_on_cuda([])


@pytest.mark.parametrize("on_cuda", [True, False])
def test_adamw_is_fused_exactly_when_the_model_is_on_cuda(monkeypatch, on_cuda):
    """build_optimizer follows all_on_cuda (faked here: fused AdamW also runs on a CPU in
    current torch, so the optimizer can be built and stepped); CPU models keep torch's default."""
    import optimizer
    from models import build_model

    monkeypatch.setattr(optimizer, "all_on_cuda", lambda groups: on_cuda)
    config = load_config(os.path.join(ROOT, DEMO_CFG))
    model = build_model(config)
    adamw = optimizer.build_optimizer(config, model)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["fused"] is (True if on_cuda else None)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    before = model.head.weight.detach().clone()
    adamw.step()
    assert not torch.equal(model.head.weight, before)


# ----------------------------------------------------------------------------- metrics.jsonl
def test_metrics_keep_before_drops_replayed_and_cut_lines(tmp_path):
    writer = JsonLinesWriter(str(tmp_path))
    for epoch in range(3):
        writer.write({"epoch": epoch, "acc1": float(epoch)})
    with open(writer.path, "a") as f:
        f.write('{"epoch": 3, "ac')  # a kill in the middle of a line
    writer.keep_before("epoch", 2)
    assert [json.loads(line) for line in open(writer.path)] == [{"epoch": 0, "acc1": 0.0}, {"epoch": 1, "acc1": 1.0}]
