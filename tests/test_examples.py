"""Every example runs at toy size, as the README shows it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, *args, cwd):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_pretrain_toy_run_learns_and_saves_a_loadable_model(tmp_path):
    summary = run_example("pretrain.py", "--toy", "--output-dir", "out", cwd=tmp_path)
    assert summary["steps"] == 40
    assert summary["last_loss"] < summary["first_loss"] - 1.0
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / "checkpoint-20" / "model.safetensors").exists()
    check = ("import openmythos, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
             f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r}); "
             "ids = t('The river', return_tensors='pt').input_ids; "
             "print(type(t).__name__, m.generate(ids, max_new_tokens=5, do_sample=False, n_loops=3).shape[1])")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["MythosTokenizer", "14"]


def test_finetune_lora_toy_run_merges_to_the_same_outputs(tmp_path):
    summary = run_example("finetune_lora.py", "--toy", "--output-dir", "lora", cwd=tmp_path)
    assert summary["merged_matches_adapter"] and summary["merged_is_plain_model"]
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()
