"""lm-evaluation-harness on a Mythos checkpoint, run as users run it:

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,n_loops=8 --tasks ... --include_path TASKS

over the YAML task pair of examples/lm_eval_tasks.py (multiple-choice loglikelihood, short greedy generation), on data
the test writes. Its scores and its per-sample loglikelihoods and generations must equal a direct computation with the
model at 8 loops, and must not be those of the checkpoint's default depth (4): so ``n_loops=8`` in ``--model_args``
reached the config's default depth.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_checkpoint import save_toy_checkpoint
from transformers import AutoModelForCausalLM

from openmythos import MythosTokenizer
from openmythos.cli import main as mythos

ROOT = Path(__file__).resolve().parents[2]
EVAL_LOOPS = 8
QUESTIONS = ["Q: 1+1=", "Which is larger?", "Name a colour:", "abc", "The loop ran", "Pick one"]
CHOICES = ["alpha", "beta", "gamma"]
GEN_PROMPTS = ["Q: 3+4=", "Hello world", "1 2 3", "The cat"]
MAX_GEN_TOKS = 8


def load_example(name):
    """examples/lm_eval_tasks.py writes the task files: the test runs the YAML that users run."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TASKS = load_example("lm_eval_tasks")


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), summed over the continuation's tokens (what lm-eval's loglikelihood is)."""
    context_ids = tokenizer(context)["input_ids"]
    ids = torch.tensor([context_ids + tokenizer(continuation)["input_ids"]])
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    return logprobs.gather(-1, targets[:, None])[len(context_ids) - 1:].sum().item()


def greedy(model, tokenizer, prompt: str, **loop_options) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=MAX_GEN_TOKS, do_sample=False, **loop_options)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    for stop in TASKS.STOP:  # where lm-eval cuts a generation: before the first of the task's `until` strings
        text = text.split(stop)[0]
    return text


def run_lm_eval(model_dir: Path, tasks_dir: Path, output: Path, home: Path) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf",
               "--model_args", f"pretrained={model_dir},trust_remote_code=True,n_loops={EVAL_LOOPS}",
               "--tasks", "mythos_cloze,mythos_next_word", "--include_path", str(tasks_dir),
               "--device", "cpu", "--batch_size", "4", "--output_path", str(output), "--log_samples"]
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_lm_eval_scores_equal_the_direct_computation_at_the_requested_depth(tmp_path):
    # one attention type: what is tested here is lm_eval's path to the loops, the same for both (the exported GQA
    # model's remote code is loaded in tests/hub/test_hub.py)
    checkpoint = save_toy_checkpoint(tmp_path / "ckpt", "mla")
    # what users pass to lm_eval: the Hub-ready folder, whose remote code trust_remote_code=True loads
    assert mythos(["export", "--from", str(checkpoint), str(tmp_path / "export")]) == 0
    tokenizer = MythosTokenizer.from_pretrained(checkpoint)
    default = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    deep = AutoModelForCausalLM.from_pretrained(checkpoint, n_loops=EVAL_LOOPS).eval()
    assert default.config.default_n_loops == 4 and deep.config.default_n_loops == EVAL_LOOPS
    assert {k: v.shape for k, v in deep.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}

    # the task data: gold answers spread over the choices; generation targets are, for the first two prompts, the
    # 8-loop greedy text and, for the others, the 4-loop one, so the score tells which depth ran
    mc_docs = [{"context": q, "choices": CHOICES, "answer": i % len(CHOICES)} for i, q in enumerate(QUESTIONS)]
    gen_docs = [{"prompt": p, "target": greedy(deep if i < 2 else default, tokenizer, p)}
                for i, p in enumerate(GEN_PROMPTS)]
    tasks = TASKS.write_tasks(tmp_path / "tasks", mc_docs, gen_docs, max_gen_toks=MAX_GEN_TOKS)

    # the direct computation, at 8 loops and at the default 4
    def scores(model):
        lls = [[loglikelihood(model, tokenizer, d["context"], " " + c) for c in CHOICES] for d in mc_docs]
        acc = sum(max(range(len(CHOICES)), key=row.__getitem__) == d["answer"] for row, d in zip(lls, mc_docs))
        texts = [greedy(model, tokenizer, d["prompt"]) for d in gen_docs]
        exact = sum(text == d["target"] for text, d in zip(texts, gen_docs))
        return lls, acc / len(mc_docs), texts, exact / len(gen_docs)

    lls, acc, texts, exact_match = scores(deep)
    shallow_lls, _, shallow_texts, shallow_exact_match = scores(default)
    assert max(abs(a - b) for row, srow in zip(lls, shallow_lls) for a, b in zip(row, srow)) > 1e-3
    assert shallow_exact_match != exact_match and shallow_texts != texts

    result = run_lm_eval(tmp_path / "export", tasks, tmp_path / "out", tmp_path / "hf-home")
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model_args"]["n_loops"] == EVAL_LOOPS
    assert results["config"]["model_num_parameters"] == sum(p.numel() for p in default.parameters())
    assert results["results"]["mythos_cloze"]["acc,none"] == pytest.approx(acc, abs=1e-12)
    assert results["results"]["mythos_next_word"]["exact_match,none"] == pytest.approx(exact_match, abs=1e-12)

    # per sample: each choice's loglikelihood and each generated text
    def samples(task):
        (path,) = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])

    for sample, row in zip(samples("mythos_cloze"), lls):
        logged = [float(ll) for ll, _greedy in sample["filtered_resps"]]
        assert logged == pytest.approx(row, abs=1e-4), sample["doc"]
    assert [sample["filtered_resps"][0] for sample in samples("mythos_next_word")] == texts
