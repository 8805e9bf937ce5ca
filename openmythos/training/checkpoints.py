"""Trainer checkpoints that survive a kill or a full disk.

``transformers.Trainer`` writes ``checkpoint-N`` in place, file by file, and ``resume_from_checkpoint=True`` takes
the highest ``checkpoint-N`` whatever state it is in. A run killed (or out of disk) in the middle of a save then
cannot resume until someone deletes the broken folder by hand. Two pieces fix that:

- ``AtomicCheckpointTrainer`` writes each checkpoint under ``partial-checkpoint-N/checkpoint-N`` in the output dir
  and renames it to ``checkpoint-N`` only once every file (weights, optimizer, scheduler, RNG state,
  ``trainer_state.json``) is written and flushed to disk. A failed save removes its partial folder, leaves the
  earlier checkpoints alone and says why ("no space left on device"). Leftovers of a killed save (folders named
  ``partial-checkpoint-N``, which only this class creates) are removed at the next save or training start.
- ``latest_complete_checkpoint`` picks the newest ``checkpoint-N`` that can really be resumed, and logs one line
  per newer folder it skips, with the reason. It also accepts checkpoints written by the plain Trainer.
"""

import errno
import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

from safetensors import safe_open
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

logger = logging.getLogger(__name__)

PARTIAL_PREFIX = "partial-" + PREFIX_CHECKPOINT_DIR
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_PARTIAL_RE = re.compile(rf"^{PARTIAL_PREFIX}-(\d+)$")
_TRAINER_STATE = "trainer_state.json"
# A failed write with this little room left is a full disk, whatever the error says.
_LOW_SPACE_BYTES = 16 * 2**20
# How a full disk shows up when the writer does not pass errno through: torch's stream writer, safetensors (Rust).
_DISK_FULL_MESSAGES = ("iostream error", "file write failed", "no space left", "storagefull", "os error 28",
                       "disk quota exceeded")


class CheckpointSaveError(OSError):
    """A checkpoint could not be written. The partial folder is gone; the earlier checkpoints are untouched."""


# ---- Finding the checkpoint to resume from ----


def _safetensors_problem(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as f:  # reads and validates the header, not the tensors
            f.keys()
    except Exception as err:  # SafetensorError is not an OSError subclass
        return f"{path.name} is unreadable ({err})"
    return None


def _torch_file_problem(path: Path) -> str | None:
    # torch.save writes a zip archive whose directory is at the end: a truncated file has none.
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError) as err:
        return f"{path.name} is truncated or unreadable ({err})"


def _index_problem(folder: Path, index_name: str) -> str | None:
    try:
        weight_map = json.loads((folder / index_name).read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{index_name} is unreadable ({err})"
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            return f"weight file {shard} listed in {index_name} is missing"
        problem = _safetensors_problem(folder / shard) if shard.endswith(".safetensors") else None
        if problem:
            return problem
    return None


def _weights_problem(folder: Path) -> str | None:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            return _index_problem(folder, index)
    for name in ("model.safetensors", "adapter_model.safetensors"):
        if (folder / name).is_file():
            return _safetensors_problem(folder / name)
    for name in ("pytorch_model.bin", "adapter_model.bin"):
        if (folder / name).is_file():
            return _torch_file_problem(folder / name)
    if any(p.is_dir() and p.name.startswith("pytorch_model_fsdp") for p in folder.iterdir()):
        return None  # FSDP sharded weights: a folder of shards that torch.distributed.checkpoint validates on load
    return "no model weights (model.safetensors or an index of shards)"


def _trainer_state_problem(folder: Path) -> str | None:
    path = folder / _TRAINER_STATE
    if not path.is_file():
        return f"{_TRAINER_STATE} is missing"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"{_TRAINER_STATE} is not valid JSON ({err})"
    if not isinstance(state, dict) or "global_step" not in state:
        return f"{_TRAINER_STATE} has no global_step"
    return None


def _optimizer_problem(folder: Path) -> str | None:
    optimizer = folder / "optimizer.pt"
    if optimizer.is_file():
        return _torch_file_problem(optimizer)
    # The Trainer writes the optimizer before the scheduler and RNG state; those without it mean a cut-off save.
    # (A save_only_model checkpoint has none of them, and FSDP/DeepSpeed keep the optimizer in a folder.)
    if any(p.is_dir() and ("optimizer" in p.name or p.name.startswith("global_step")) for p in folder.iterdir()):
        return None
    if (folder / "scheduler.pt").is_file() or any(folder.glob("rng_state*.pth")):
        return "optimizer.pt is missing"
    return None


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` cannot be resumed from, in a few words, or None when it is complete.

    Complete means: the weights open (safetensors header readable, every shard an index lists present), the
    optimizer state is there whenever the scheduler or RNG state is, and ``trainer_state.json`` parses.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    for check in (_weights_problem, _optimizer_problem, _trainer_state_problem):
        problem = check(folder)
        if problem:
            return problem
    return None


def _checkpoint_folders(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders of ``output_dir``, newest (highest N) first."""
    found = [p for p in output_dir.iterdir() if _CHECKPOINT_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_CHECKPOINT_RE.match(p.name).group(1)), reverse=True)


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that can be resumed from, or None when there is none.

    Each newer folder that is skipped gets one warning naming it and the reason (see ``checkpoint_problem``).
    Folders of an unfinished atomic save (``partial-checkpoint-N``) are never candidates.
    """
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"`output_dir` must be a str or os.PathLike folder path, got {type(output_dir).__name__}")
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    for folder in _checkpoint_folders(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        logger.warning("Skipping incomplete checkpoint %s: %s", folder, problem)
    return None


def has_checkpoints(output_dir: str | os.PathLike) -> bool:
    """Whether ``output_dir`` holds any ``checkpoint-N`` folder, complete or not."""
    output_dir = Path(output_dir)
    return output_dir.is_dir() and bool(_checkpoint_folders(output_dir))


def remove_partial_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Delete what killed atomic saves left in ``output_dir`` (only ``partial-checkpoint-N`` folders)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    removed = []
    for folder in sorted(output_dir.iterdir()):
        if _PARTIAL_RE.match(folder.name) and folder.is_dir():
            shutil.rmtree(folder)
            logger.warning("Removed %s, left by a checkpoint save that did not finish", folder)
            removed.append(str(folder))
    return removed


# ---- Writing checkpoints atomically ----


def _fsync_tree(folder: Path) -> None:
    # Without this a power cut after the rename could leave a complete-looking folder of empty files.
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _is_disk_full(err: BaseException, free: int | None) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    if any(text in str(err).lower() for text in _DISK_FULL_MESSAGES):
        return True
    return isinstance(err, (OSError, RuntimeError)) and free is not None and free < _LOW_SPACE_BYTES


def save_failure(err: BaseException, checkpoint: Path) -> CheckpointSaveError | None:
    """The plain-words error for a failed write of ``checkpoint``, or None when ``err`` is no write failure.

    Call it before the partial files are removed, so the free space it reports is the space the save ran out of.
    """
    free = _free_bytes(checkpoint.parent)
    where = f"could not save {checkpoint.name} in {checkpoint.parent}"
    tail = "the partial save was removed and the earlier checkpoints are untouched"
    if _is_disk_full(err, free):
        room = f"{free} bytes free" if free is not None else "free space unknown"
        return CheckpointSaveError(errno.ENOSPC, f"{where}: no space left on device ({room}); {tail}")
    if isinstance(err, OSError):
        return CheckpointSaveError(err.errno, f"{where}: {err}; {tail}")
    return None


class AtomicCheckpointTrainer(Trainer):
    """``Trainer`` whose checkpoints appear whole or not at all, and whose ``resume_from_checkpoint=True``
    resumes from the newest complete checkpoint (see the module docstring).

    The stock ``_save_checkpoint`` does all the writing; this class only points it at a staging folder (through
    ``_get_output_dir``), then renames the result into place, rotates old checkpoints and pushes to the Hub.
    """

    _staging_root: str | None = None

    def _get_output_dir(self, trial) -> str:
        return self._staging_root or super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._staging_root is None:  # while staging the folder is about to move: push after the rename
            super()._push_from_checkpoint(checkpoint_folder)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.args.should_save:
            remove_partial_checkpoints(self.args.output_dir)
        if resume_from_checkpoint is True:
            resume_from_checkpoint = latest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"`resume_from_checkpoint=True` but {self.args.output_dir} holds no complete "
                                 "checkpoint-N folder; pass a folder path, or None to start from scratch")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, staging_root = run_dir / name, run_dir / f"{PARTIAL_PREFIX}-{self.state.global_step}"
        staged = staging_root / name
        if self.args.should_save:
            remove_partial_checkpoints(run_dir)
        self.accelerator.wait_for_everyone()
        self._staging_root = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)  # writes staged/ and rotates inside staging_root (a no-op)
            self.accelerator.wait_for_everyone()  # every rank has written its files
            if self.args.should_save:
                self._fix_best_checkpoint_path(staged, final)
                _fsync_tree(staged)
        except Exception as err:
            failure = save_failure(err, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            if failure is None:
                raise
            raise failure from err
        finally:
            self._staging_root = None
        if self.args.should_save:
            self._move_into_place(staged, final, staging_root)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(str(final))

    def _fix_best_checkpoint_path(self, staged: Path, final: Path) -> None:
        # The stock save records the best checkpoint under the folder it wrote to: point it at the final name.
        if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint) == staged:
            self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(staged / _TRAINER_STATE))

    @staticmethod
    def _move_into_place(staged: Path, final: Path, staging_root: Path) -> None:
        if final.exists():  # saving a step again (a rerun in the same folder): the old copy goes only after
            os.replace(final, staging_root / "replaced")
        os.replace(staged, final)
        _fsync_dir(final.parent)
        shutil.rmtree(staging_root)
