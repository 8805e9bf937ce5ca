import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (the CI command runs two workers) each worker takes one thread, so the two share the cores.
torch.set_num_threads(1 if "PYTEST_XDIST_WORKER" in os.environ else min(2, torch.get_num_threads()))

import openmythos  # noqa: E402  (registers the Auto classes)
from openmythos import MythosForCausalLM, mythos_tiny  # noqa: E402

ATTN_TYPES = ["mla", "gqa"]


def make_model(attn_type="mla", seed=0, **overrides) -> MythosForCausalLM:
    """A tiny model with every weight random (LoRA up and halting included), in eval mode."""
    torch.manual_seed(seed)
    model = MythosForCausalLM(mythos_tiny(attn_type=attn_type, **overrides)).eval()
    with torch.no_grad():
        # Zero-initialised pieces would hide bugs in the paths they gate; give them real values.
        if model.model.recurrent.lora is not None:
            model.model.recurrent.lora.up.normal_(0, 0.02)
        model.model.recurrent.layer.mlp.gate.e_score_correction_bias.normal_(0, 0.01)
    return model


@pytest.fixture(params=ATTN_TYPES)
def attn_type(request):
    return request.param


@pytest.fixture
def model(attn_type):
    return make_model(attn_type)


@pytest.fixture
def input_ids():
    torch.manual_seed(1)
    return torch.randint(3, 512, (2, 12))


def run_on_two_processes(worker_file, *args, out, while_running, timeout=300):
    """Run ``worker_file`` under torchrun on 2 CPU processes (gloo) with ``args``, and ``while_running()`` (the
    single-process reference) meanwhile. Returns what rank 0 saved to ``out`` and what ``while_running`` returned."""
    import subprocess
    import sys
    from pathlib import Path

    run = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker_file),
         *map(str, args)],
        cwd=Path(__file__).resolve().parents[1], env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        reference = while_running()
        log, _ = run.communicate(timeout=timeout)
    finally:
        if run.poll() is None:  # the reference failed or the workers hung: stop torchrun and its workers
            run.terminate()
            run.communicate()
    assert run.returncode == 0, log[-5000:]
    return torch.load(out, weights_only=False), reference


# The suite runs on two pytest-xdist workers, one file at a time each (pytest.ini). Files are handed out in
# collection order (--no-loadscope-reorder), so the slowest go first: started last, one of them would leave the
# other worker idle.
SLOWEST_FIRST = ["tests/test_benchmarks.py", "tests/test_readme.py", "tests/test_examples.py",
                 "tests/demo/test_demo.py", "tests/demo/test_text_demo.py", "tests/hub/test_hub.py",
                 "tests/training/test_data_parallel.py",
                 "tests/models/mythos/test_parallel_plans.py", "tests/models/mythos/test_compile_mythos.py",
                 "tests/serving/test_lm_eval.py", "tests/serving/test_transformers_serve.py", "tests/test_plan.py",
                 "tests/models/mythos/test_continuous_batching.py", "tests/hub/test_cli.py"]


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}

    def file_rank(item):
        path = item.nodeid.split("::", 1)[0]
        return rank.get(path, len(SLOWEST_FIRST))

    items.sort(key=file_rank)  # stable: the order inside a file and among the other files is kept
