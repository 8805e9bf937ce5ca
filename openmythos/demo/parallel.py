"""Training the demo's models on two cores: the models are too small for a second torch thread to speed one of them
up, but two processes, one model each, use both cores of a small machine.

Each model's training is seeded by itself (initial weights, data order, loop sampling), so a model trained in the
second process ends with exactly the weights it would have had in one process (tested).
"""

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import torch
from transformers.utils import logging as hf_logging


def jobs(args) -> int:
    """Training processes: ``--jobs``, by default 2 where there are 2 or more CPUs and no GPU, else 1."""
    if getattr(args, "jobs", None) is not None:
        return args.jobs
    return 2 if (os.cpu_count() or 1) >= 2 and not torch.cuda.is_available() else 1


def _train_side(train_one, models: dict, threads: int) -> dict:
    """The second process's share (a fresh interpreter, spawned): train ``models`` one after another, return what
    ``train_one`` returned for each and its weights."""
    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    return {name: (train_one(name, model, progress_bar=False), model.state_dict()) for name, model in models.items()}


def train_models(models: dict, train_one, side: list[str], args) -> dict:
    """Train every model with ``train_one(name, model, progress_bar=...)`` (a picklable callable, which may also
    score the model) and return what it returned for each, in the order of ``models``. With 2 jobs (``jobs(args)``)
    the models named in ``side`` train one after another in a second, spawned process while the others train here,
    with a progress bar; their trained weights are then loaded into ``models``."""
    side = [name for name in side if name in models]
    if jobs(args) == 1 or not side:
        return {name: train_one(name, model) for name, model in models.items()}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        future = pool.submit(_train_side, train_one, {name: models[name] for name in side}, args.threads)
        records = {name: train_one(name, model) for name, model in models.items() if name not in side}
        for name, (record, weights) in future.result().items():
            models[name].load_state_dict(weights)
            records[name] = record
    return {name: records[name] for name in models}
