"""Checkpoint files (utils.py): written atomically; damaged, truncated, text and unsafe files told
apart with one-line errors naming the file (one that needs unpickling refused before it runs
anything, also through main.py); the newest loadable of epoch and step checkpoints; the newest K
kept; a missing EMA entry named."""
import logging
import os
import re

import pytest
import torch

from config import UserError
from conftest import DEMO_CFG, run_main
from utils import load_checkpoint_file, model_state, newest_loadable_checkpoint, prune_checkpoints, \
    remove_step_checkpoints, resume_position, write_checkpoint


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_epoch_0.pth"
    write_checkpoint({"model": {"w": torch.ones(3)}}, str(path))

    def dies_half_way(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint({"model": {"w": torch.zeros(3)}}, str(path))
    assert os.listdir(tmp_path) == ["ckpt_epoch_0.pth"]
    torch.testing.assert_close(load_checkpoint_file(str(path))["model"]["w"], torch.ones(3))


def test_damaged_checkpoints_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint_file(str(tmp_path / "missing.pth"))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=f"cannot read checkpoint {empty}"):
        load_checkpoint_file(str(empty))


class CallsSystem:
    """Unpickling this calls ``os.system``: a checkpoint that runs a command."""

    def __reduce__(self):
        return os.system, ("true",)


def test_checkpoint_files_are_told_apart(tmp_path, monkeypatch):
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes\n")
    system_zip = tmp_path / "system.pth"
    torch.save({"model": {"w": torch.ones(1)}, "hook": CallsSystem()}, system_zip)
    system_legacy = tmp_path / "system_legacy.pth"
    torch.save({"model": {"w": torch.ones(1)}, "hook": CallsSystem()}, system_legacy,
               _use_new_zipfile_serialization=False)
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.ones(1)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": {"w": torch.ones(1)}}, legacy, _use_new_zipfile_serialization=False)

    with pytest.raises(UserError, match=f"^{re.escape(str(text))} is not a checkpoint: not a file written by torch.save$"):
        load_checkpoint_file(str(text))
    with pytest.raises(UserError, match=r"^cannot read checkpoint .*truncated.pth: damaged"):
        load_checkpoint_file(str(truncated))
    assert torch.equal(load_checkpoint_file(str(legacy))["model"]["w"], torch.ones(1))
    refused = rf"^refusing to load .*: it needs full unpickling, which can run code \(it imports {os.name}\.system\)"
    for path in (system_zip, system_legacy):
        with pytest.raises(UserError, match=refused):
            load_checkpoint_file(str(path))
    # torch before 2.5 has no get_unsafe_globals_in_checkpoint: the opcode listing answers instead
    monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint")
    with pytest.raises(UserError, match=refused):
        load_checkpoint_file(str(system_zip))
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint_file(str(truncated))


class CreatesFile:
    """Unpickling this object opens (creates) a file: code running from a checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("flag", ["--resume", "--pretrained"])
def test_checkpoint_needing_unpickling_is_refused_and_runs_nothing(digits_dir, tmp_path, flag):
    victim = tmp_path / "created_by_checkpoint"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"head.bias": torch.zeros(10)}, "note": CreatesFile(str(victim))}, evil)
    result = run_main("--cfg", DEMO_CFG, "--data-path", digits_dir, "--output", tmp_path, "--eval", flag, evil)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert f"refusing to load {evil}" in result.stderr and "--trust-checkpoints" in result.stderr
    assert "Traceback" not in result.stderr
    assert not victim.exists()
    load_checkpoint_file(str(evil), trust=True)  # the opt-in really unpickles: the file appears
    assert victim.exists()


def test_newest_loadable_checkpoint_orders_epoch_and_step_checkpoints(tmp_path):
    def write(name, **extra):
        write_checkpoint({"model": {}, "optimizer": {}, "lr_scheduler": {}, **extra}, str(tmp_path / name))

    write("ckpt_epoch_0.pth", epoch=0)
    write("ckpt_epoch_1_step_30.pth", epoch=1, step=30)
    write("ckpt_epoch_2_step_0.pth", epoch=2, step=0)
    logger = logging.getLogger("test")
    path, checkpoint = newest_loadable_checkpoint(str(tmp_path), logger)
    assert path.endswith("ckpt_epoch_2_step_0.pth") and resume_position(checkpoint) == (2, 0)
    (tmp_path / "ckpt_epoch_2_step_0.pth").write_bytes(b"damaged")
    path, checkpoint = newest_loadable_checkpoint(str(tmp_path), logger)
    assert path.endswith("ckpt_epoch_1_step_30.pth") and resume_position(checkpoint) == (1, 30)
    remove_step_checkpoints(str(tmp_path))
    path, checkpoint = newest_loadable_checkpoint(str(tmp_path), logger)
    assert path.endswith("ckpt_epoch_0.pth") and resume_position(checkpoint) == (1, 0)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_epoch_0.pth"]


def test_prune_checkpoints_keeps_newest(tmp_path):
    for name in ("ckpt_epoch_1.pth", "ckpt_epoch_10.pth", "ckpt_epoch_2.pth", "best.pth", "ckpt_epoch_x.pth"):
        (tmp_path / name).write_bytes(b"x")
    assert prune_checkpoints(str(tmp_path), 0) == []
    deleted = prune_checkpoints(str(tmp_path), 2)
    assert deleted == [str(tmp_path / "ckpt_epoch_1.pth")]
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "ckpt_epoch_10.pth", "ckpt_epoch_2.pth", "ckpt_epoch_x.pth"]


def test_checkpoint_without_ema_weights_is_named(tmp_path):
    path = tmp_path / "plain.pth"
    write_checkpoint({"model": {"w": torch.ones(1)}}, str(path))
    with pytest.raises(UserError, match=f"{path} has no 'model_ema' entry"):
        model_state(load_checkpoint_file(str(path)), str(path), "model_ema")
