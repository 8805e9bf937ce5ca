"""Checkpoints survive faults: a broken newest checkpoint is skipped on resume, a save is atomic, a full disk says so."""

import errno
import json
import logging
import os
import shutil

import pytest
import torch
import transformers.modeling_utils
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from openmythos import MythosForCausalLM, mythos_tiny
from openmythos.training.checkpoints import (
    AtomicCheckpointTrainer,
    CheckpointSaveError,
    checkpoint_problem,
    latest_complete_checkpoint,
    remove_partial_checkpoints,
)


def collate(rows):
    input_ids = torch.tensor([row["input_ids"] for row in rows])
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def make_trainer(output_dir, max_steps, trainer_cls=AtomicCheckpointTrainer, eval_rows=0, **args):
    torch.manual_seed(0)
    model = MythosForCausalLM(mythos_tiny(vocab_size=64, max_seq_len=16, backprop_loops=1))
    data = [{"input_ids": torch.randint(3, 64, (8,)).tolist()} for _ in range(16)]
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2,
                             learning_rate=1e-3, logging_steps=1, save_steps=1, seed=0, report_to="none",
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, **args)
    return trainer_cls(model=model, args=args, train_dataset=data, eval_dataset=data[:eval_rows] or None,
                       data_collator=collate)


@pytest.fixture(scope="module")
def plain_checkpoints(tmp_path_factory):
    """checkpoint-1 and checkpoint-2 written by the stock Trainer (the non-atomic writer used before)."""
    out = tmp_path_factory.mktemp("plain")
    make_trainer(out, 2, trainer_cls=Trainer).train()
    return out


def copy_run(plain_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(plain_checkpoints, out)
    return out


def truncate(path):
    os.truncate(path, path.stat().st_size // 2)


CORRUPTIONS = {
    "truncated safetensors": (lambda c: truncate(c / "model.safetensors"), "model.safetensors is unreadable"),
    "no weights": (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
    "invalid trainer_state.json": (lambda c: (c / "trainer_state.json").write_text('{"global_step": 2, "log'),
                                   "trainer_state.json is not valid JSON"),
    "missing trainer_state.json": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "truncated optimizer": (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt is truncated"),
    "missing optimizer": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_broken_newest_checkpoint_is_skipped_with_its_name_and_reason(plain_checkpoints, tmp_path, caplog,
                                                                      corruption):
    out = copy_run(plain_checkpoints, tmp_path)
    damage, reason = CORRUPTIONS[corruption]
    damage(out / "checkpoint-2")
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")  # what the stock resume would pick
    with caplog.at_level(logging.WARNING, logger="openmythos.training.checkpoints"):
        assert latest_complete_checkpoint(out) == str(out / "checkpoint-1")
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 1
    assert str(out / "checkpoint-2") in skipped[0] and reason in skipped[0]


def test_sharded_checkpoint_with_a_missing_shard_is_skipped(plain_checkpoints, tmp_path):
    out = copy_run(plain_checkpoints, tmp_path)
    newest = out / "checkpoint-2"
    (newest / "model.safetensors").rename(newest / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (newest / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_problem(newest) == ("weight file model-00002-of-00002.safetensors listed in "
                                          "model.safetensors.index.json is missing")
    assert latest_complete_checkpoint(out) == str(out / "checkpoint-1")


def test_checkpoints_of_the_stock_trainer_are_found_and_empty_folders_give_none(plain_checkpoints, tmp_path):
    assert latest_complete_checkpoint(plain_checkpoints) == str(plain_checkpoints / "checkpoint-2")
    assert checkpoint_problem(plain_checkpoints / "checkpoint-1") is None
    assert latest_complete_checkpoint(tmp_path) is None
    assert latest_complete_checkpoint(tmp_path / "absent") is None


def test_output_dir_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"`output_dir` must be a str or os.PathLike folder path, got int"):
        latest_complete_checkpoint(3)


def test_resume_true_continues_from_the_newest_complete_checkpoint(plain_checkpoints, tmp_path, caplog):
    out = copy_run(plain_checkpoints, tmp_path)
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    trainer = make_trainer(out, 3)
    with caplog.at_level(logging.WARNING, logger="openmythos.training.checkpoints"):
        trainer.train(resume_from_checkpoint=True)
    assert any("checkpoint-2" in r.getMessage() for r in caplog.records)
    steps = [e["step"] for e in trainer.state.log_history if "loss" in e]
    assert steps == [1, 2, 3]  # step 1 comes from checkpoint-1's state; steps 2 and 3 were trained again
    assert checkpoint_problem(out / "checkpoint-2") is None  # the resumed run saved step 2 again, whole


def test_resume_true_without_a_complete_checkpoint_says_so(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ValueError, match=r"holds no complete checkpoint-N folder"):
        make_trainer(tmp_path, 3).train(resume_from_checkpoint=True)


def test_atomic_saves_rotate_and_leave_only_checkpoint_folders(tmp_path):
    trainer = make_trainer(tmp_path, 4, save_total_limit=2)
    trainer.train()
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["checkpoint-3", "checkpoint-4"]
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_leftover_of_a_killed_save_is_never_a_checkpoint_and_is_removed_next_time(plain_checkpoints, tmp_path):
    out = copy_run(plain_checkpoints, tmp_path)
    leftover = out / "partial-checkpoint-9" / "checkpoint-9"
    shutil.copytree(out / "checkpoint-2", leftover)  # even a finished-looking one: the rename never happened
    user_folder = out / "notes-checkpoint-9"
    user_folder.mkdir()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert latest_complete_checkpoint(out) == str(out / "checkpoint-2")
    trainer = make_trainer(out, 3)
    trainer.train(resume_from_checkpoint=True)
    assert not (out / "partial-checkpoint-9").exists()
    assert user_folder.is_dir()  # only the trainer's own staging folders are removed
    assert remove_partial_checkpoints(out) == []


def fail_on(monkeypatch, target, error):
    """Make the weights write (``target="weights"``) or the optimizer write raise ``error``, after writing half."""
    if target == "weights":
        real = transformers.modeling_utils.safe_save_file

        def broken(tensors, filename, *args, **kwargs):
            real(tensors, filename, *args, **kwargs)
            truncate_file(filename)
            raise error

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", broken)
    else:
        real = torch.save

        def broken(obj, f, *args, **kwargs):
            real(obj, f, *args, **kwargs)
            if str(f).endswith("optimizer.pt"):
                truncate_file(f)
                raise error

        monkeypatch.setattr(torch, "save", broken)


def truncate_file(filename):
    os.truncate(filename, os.path.getsize(filename) // 2)


DISK_FULL = {
    "ENOSPC from the weights": ("weights", OSError(errno.ENOSPC, "No space left on device")),
    "torch iostream error from the optimizer": ("optimizer", RuntimeError("basic_ios::clear: iostream error")),
    "ENOSPC from the optimizer": ("optimizer", OSError(errno.ENOSPC, "No space left on device")),
}


@pytest.mark.parametrize("case", sorted(DISK_FULL))
def test_full_disk_during_a_save_says_no_space_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, case):
    trainer = make_trainer(tmp_path, 2)
    trainer.args.max_steps = 1
    trainer.train()
    before = sorted(p.name for p in (tmp_path / "checkpoint-1").iterdir())
    target, error = DISK_FULL[case]
    trainer = make_trainer(tmp_path, 2)
    fail_on(monkeypatch, target, error)
    with pytest.raises(CheckpointSaveError) as caught:
        trainer.train(resume_from_checkpoint=True)
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert "no space left on device" in message and "bytes free" in message
    assert f"could not save checkpoint-2 in {tmp_path}" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # the partial save is gone
    assert sorted(p.name for p in (tmp_path / "checkpoint-1").iterdir()) == before
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")


def test_other_write_errors_keep_their_reason(tmp_path, monkeypatch):
    fail_on(monkeypatch, "optimizer", PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(CheckpointSaveError, match=r"could not save checkpoint-1 in .*Permission denied") as caught:
        make_trainer(tmp_path, 1).train()
    assert caught.value.errno == errno.EACCES and "no space" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_best_checkpoint_is_recorded_under_its_final_name(tmp_path):
    trainer = make_trainer(tmp_path, 3, eval_strategy="steps", eval_steps=1, metric_for_best_model="loss",
                           load_best_model_at_end=True, save_total_limit=2, eval_rows=2)
    trainer.train()
    best = tmp_path / f"checkpoint-{trainer.state.best_global_step}"
    assert trainer.state.best_model_checkpoint == str(best)
    assert checkpoint_problem(best) is None and checkpoint_problem(tmp_path / "checkpoint-3") is None
    for saved in ("checkpoint-3", best.name):  # the state written inside each checkpoint names the final folder
        state = json.loads((tmp_path / saved / "trainer_state.json").read_text())
        assert state["best_model_checkpoint"] == str(best)
