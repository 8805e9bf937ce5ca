"""benchmarks/gpu_check.sh and its helper benchmarks/gpu_mfu.py, checked without a GPU: the dry run lists every step
within the time budget, the FLOP count behind MFU equals torch's FlopCounterMode, and the report is written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_mfu  # noqa: E402

from openmythos import MythosForCausalLM, mythos_1b, mythos_tiny  # noqa: E402

STEPS = ("flash_attention", "fsdp_trainer", "parallel_nccl", "mfu", "decode")


def test_gpu_check_dry_run_lists_every_step_within_eight_minutes():
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("step ")]
    assert tuple(line[1] for line in lines) == STEPS
    commands = {line[1]: " ".join(line[4:]) for line in lines}
    assert "-k flash_attention" in commands["flash_attention"]
    assert "accelerate.commands.launch --config_file examples/accelerate_fsdp.yaml" in commands["fsdp_trainer"]
    assert "--precision bf16" in commands["fsdp_trainer"]
    assert "MYTHOS_TEST_BACKEND=nccl" in commands["parallel_nccl"] and "-k parallel" in commands["parallel_nccl"]
    assert "--preset mythos_1b --attn sdpa flash_attention_2" in commands["mfu"]
    assert "--batch-sizes 1 64" in commands["decode"]
    limits = [int(line[3].rstrip("s")) for line in lines]
    assert sum(limits) <= 8 * 60 and f"total time limit: {sum(limits)}s" in result.stdout


def test_gpu_check_refuses_unknown_arguments_in_one_line():
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--fast"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--dry-run" in result.stderr


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_model_flops_equal_flop_counter_of_a_training_step(attn_type):
    """The MFU numerator counts exactly the matmuls a training step runs (eager attention and experts, where every
    product is an mm/bmm torch's counter sees)."""
    torch.manual_seed(0)
    config = mythos_tiny(attn_type=attn_type)
    model = MythosForCausalLM._from_config(config, attn_implementation="eager").train()
    model.set_experts_implementation("eager")
    ids = torch.randint(4, config.vocab_size, (2, 32))
    counter = FlopCounterMode(display=False)
    with counter:
        model(ids, labels=ids, n_loops=3).loss.backward()
    assert gpu_mfu.model_flops(config, 2, 32, n_loops=3) == counter.get_total_flops()


def test_mfu_dry_run_prints_the_step_without_a_gpu(capsys):
    assert gpu_mfu.main(["train", "--dry-run", "--batch", "1", "--seq-len", "1024"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["preset"] == "mythos_1b" and summary["n_loops"] == 16
    assert summary["model_tflops_per_step"] == pytest.approx(gpu_mfu.model_flops(mythos_1b(), 1, 1024) / 1e12)
    with pytest.raises(SystemExit):
        gpu_mfu.parse_args(["train", "--seq-len", "0"])
    assert gpu_mfu.main(["train", "--dry-run", "--preset", "mythos_2b"]) == 2


def test_train_and_decode_measurements_run_the_same_code_on_cpu(tmp_path):
    """The GPU steps' code, on the CPU with the tiny preset: every attention kernel measured, every batch decoded."""
    torch.set_num_threads(1)
    train_json, decode_json = tmp_path / "mfu.json", tmp_path / "decode.json"
    assert gpu_mfu.main(["train", "--device", "cpu", "--preset", "mythos_tiny", "--attn", "eager", "sdpa", "--batch",
                         "1", "--seq-len", "16", "--steps", "1", "--warmup", "0", "--json", str(train_json)]) == 0
    assert gpu_mfu.main(["decode", "--device", "cpu", "--preset", "mythos_tiny", "--attn", "sdpa", "--batch-sizes",
                         "1", "3", "--prompt-len", "8", "--new-tokens", "4", "--json", str(decode_json)]) == 0
    trained, decoded = json.loads(train_json.read_text()), json.loads(decode_json.read_text())
    assert set(trained["results"]) == {"eager", "sdpa"} and trained["n_loops"] == 4
    for r in trained["results"].values():
        assert r["step_s"] > 0 and r["achieved_tflops"] > 0 and r["mfu"] is None
        assert r["model_tflops_per_step"] == pytest.approx(gpu_mfu.model_flops(mythos_tiny(), 1, 16) / 1e12)
    assert {b: r["new_tokens"] for b, r in decoded["results"].items()} == {"1": 4, "3": 12}
    assert all(r["tokens_per_s"] > 0 for r in decoded["results"].values())


def test_report_writes_the_json_and_the_table(tmp_path):
    steps = [{"step": "mfu", "rc": 0, "timed_out": False, "seconds": 41.0, "command": "c", "log_tail": ""},
             {"step": "decode", "rc": 124, "timed_out": True, "seconds": 60.0, "command": "c", "log_tail": ""},
             {"step": "parallel_nccl", "rc": 5, "timed_out": False, "seconds": 3.0, "command": "python -m pytest -q",
              "log_tail": ""}]
    (tmp_path / "steps.jsonl").write_text("\n".join(json.dumps(s) for s in steps) + "\n")
    mfu = {"preset": "mythos_1b", "batch": 2, "seq_len": 2048, "n_loops": 16, "model_tflops_per_step": 68.3,
           "results": {"sdpa": {"step_s": 0.2, "achieved_tflops": 341.5, "mfu": 0.345, "peak_memory_gb": 30.0}}}
    (tmp_path / "mfu.json").write_text(json.dumps(mfu))
    table = gpu_mfu.report(tmp_path, "NVIDIA H100 80GB HBM3", 1, "2.13.0")
    assert "| mfu | passed | 41.0 |" in table and "| decode | timed out | 60.0 |" in table
    assert "| parallel_nccl | no test matched | 3.0 |" in table
    assert "| sdpa | 0.200 | 341.5 | 34.5% | 30.0 |" in table
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["mfu"] == mfu and data["steps"] == steps and (tmp_path / "gpu_check.md").read_text() == table
