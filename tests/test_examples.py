"""Every example runs at toy size, as the README shows it."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "examples" / "pretrain.py"
# Six optimizer steps with a checkpoint every two; loop-count sampling stays on, as in every toy run.
SHORT_TOY = ["--toy", "--max-steps", "6", "--save-steps", "2", "--seq-len", "16", "--batch-size", "2",
             "--logging-steps", "1"]


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


# Runs pretrain.py as __main__, but the process dies (like a SIGKILL) halfway through writing optimizer.pt of the
# second checkpoint: the file is left truncated and nothing after it (scheduler, RNG, trainer state) is written.
KILLED_DURING_SAVE = textwrap.dedent("""
    import os, runpy, sys
    import torch

    real_save, optimizer_saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            optimizer_saves.append(f)
            if len(optimizer_saves) == 2:
                real_save(obj, f, *args, **kwargs)
                os.truncate(f, os.path.getsize(f) // 2)
                os._exit(137)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def per_step(output_dir):
    state = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())
    return {e["step"]: (e["loss"], e["grad_norm"]) for e in state["log_history"] if "loss" in e}


def test_pretrain_killed_during_a_checkpoint_save_resumes_to_the_uninterrupted_losses(tmp_path):
    run_example("pretrain.py", *SHORT_TOY, "--output-dir", "straight", cwd=tmp_path)

    driver = tmp_path / "killed_during_save.py"
    driver.write_text(KILLED_DURING_SAVE)
    killed = subprocess.run([sys.executable, str(driver), str(PRETRAIN), *SHORT_TOY, "--output-dir", "resumed"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stderr[-3000:]
    resumed = tmp_path / "resumed"
    assert not (resumed / "checkpoint-4").exists()  # the cut-off save never took a checkpoint's name
    assert (resumed / "checkpoint-2" / "trainer_state.json").exists()

    result = subprocess.run([sys.executable, str(PRETRAIN), *SHORT_TOY, "--output-dir", "resumed", "--resume"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {Path('resumed') / 'checkpoint-2'}" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 6
    assert sorted(p.name for p in resumed.glob("*checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]

    straight_steps, resumed_steps = per_step(tmp_path / "straight"), per_step(resumed)
    assert sorted(resumed_steps) == [1, 2, 3, 4, 5, 6]
    for step, (loss, grad_norm) in straight_steps.items():
        assert abs(resumed_steps[step][0] - loss) <= 1e-6 and abs(resumed_steps[step][1] - grad_norm) <= 1e-6, step
    straight_weights = load_file(tmp_path / "straight" / "model.safetensors")
    resumed_weights = load_file(resumed / "model.safetensors")
    assert straight_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(straight_weights[k], resumed_weights[k]) for k in straight_weights)


def test_pretrain_resume_refuses_a_folder_whose_checkpoints_are_all_broken(tmp_path):
    broken = tmp_path / "out" / "checkpoint-4"
    broken.mkdir(parents=True)
    (broken / "trainer_state.json").write_text("{")
    result = subprocess.run([sys.executable, str(PRETRAIN), *SHORT_TOY, "--output-dir", "out", "--resume"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert f"Skipping incomplete checkpoint {Path('out') / 'checkpoint-4'}: no model weights" in result.stderr
    assert "--resume: no complete checkpoint-N folder in out" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-4"]  # nothing trained or deleted
