"""The README is part of the product: its commands and code must run as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openmythos.parameters import preset_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_setup_and_test_commands_and_ci_runs_the_test_one():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    setup_and_run, setup_and_test = commands[0].strip(), commands[1].strip()
    assert "pip install" in setup_and_run and "torch==2.13.0" in setup_and_run
    assert '-e ".[demo]"' in setup_and_run and setup_and_run.endswith(".venv/bin/mythos demo")
    assert setup_and_test.endswith("python -m pytest -q") and "torch==2.13.0" in setup_and_test
    assert setup_and_test in (ROOT / ".ci/run").read_text()


def test_readme_preset_table_is_the_generated_one():
    table = README.split("<!-- preset-table:start -->\n")[1].split("\n<!-- preset-table:end -->")[0]
    assert table == preset_table()


def test_readme_python_quick_start_runs_as_written(tmp_path):
    code = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Parameters:" in result.stdout and "rho(A)" in result.stdout
    assert (tmp_path / "mythos-demo" / "model.safetensors").exists()


def test_readme_adaptive_depth_example_runs_as_written():
    code = [block for block in re.findall(r"```python\n(.*?)```", README, re.S) if "MythosLoopRecorder" in block]
    assert len(code) == 1
    namespace = {}
    exec(compile(code[0], "README.md (adaptive depth)", "exec"), namespace)
    assert namespace["out"].loops_used.shape == (2, 12) and (namespace["out"].loops_used[0] <= 2).all()
    assert namespace["recorder"].token_loops().shape == (2, 16)


def test_readme_kv_sharing_example_runs_as_written():
    code = [block for block in re.findall(r"```python\n(.*?)```", README, re.S) if "loop_kv_sharing" in block]
    assert len(code) == 1
    namespace = {}
    exec(compile(code[0], "README.md (KV sharing)", "exec"), namespace)
    assert namespace["tokens"].shape == (1, 16)


def test_readme_continuous_batching_example_runs_as_written():
    code = [block for block in re.findall(r"```python\n(.*?)```", README, re.S) if "generate_batch" in block]
    assert len(code) == 1
    namespace = {}
    exec(compile(code[0], "README.md (continuous batching)", "exec"), namespace)
    model, prompts = namespace["model"], namespace["prompts"]
    for prompt, budget, tokens in zip(prompts, [1, 4, 2], namespace["tokens"]):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, n_loops=budget)
        assert tokens == expected[0, len(prompt):].tolist()


def test_quickstart_command_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "openmythos.cli", "quickstart", "--n-loops", "1", "5"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("same tokens: True") == 2
    assert "[MLA] n_loops=5" in result.stdout and "[GQA] n_loops=1" in result.stdout


def test_readme_training_and_hub_commands_run(tmp_path):
    """The toy pretraining, export, dry-run push and plan lines of the README, run as written (venv paths mapped)."""
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)\n```", README, re.S) for line in block.splitlines()]
    wanted = [line for line in lines if "pretrain.py --toy" in line
              or (line.startswith(".venv/bin/mythos ") and not line.startswith(".venv/bin/mythos serve "))]
    assert len(wanted) == 4, wanted
    bindir = Path(sys.executable).parent
    for line in wanted:
        command = re.sub(r"(?<![\w/])\.venv/bin/", f"{bindir}/", line.split("  #")[0])
        command = re.sub(r"(?<![\w/])examples/", f"{ROOT}/examples/", command)
        result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (command, result.stderr[-3000:])
    assert (tmp_path / "runs" / "hub" / "README.md").exists()
    assert "would upload" in result.stdout


def assert_made_with_the_defaults(settings: dict, defaults: dict) -> None:
    """A recorded run's settings are the demo's current defaults (the output folder and --overwrite aside). A flag
    added after the run that this task leaves unset (None, e.g. the hidden task's --pack for --task context, or
    --state-noise) cannot have changed it."""
    settings = {k: v for k, v in settings.items() if k not in ("output_dir", "overwrite")}
    unset_later = {k for k, v in defaults.items() if v is None and k not in settings}
    assert settings == {k: v for k, v in defaults.items()
                        if k not in ("output_dir", "overwrite") and k not in unset_later}


@pytest.mark.parametrize("marker, folder, argv", [
    ("demo-table", "docs/demo", []),
    ("demo-context-table", "docs/demo/context", ["--task", "context"]),
])
def test_readme_demo_tables_are_the_recorded_default_runs(marker, folder, argv):
    """README's demo tables are the accuracy.md files that the recorded runs (results.json beside them) produced with
    the demo's current default settings for each task."""
    import argparse
    import json

    from openmythos.demo import format_table, parse_args

    table = README.split(f"<!-- {marker}:start -->\n")[1].split(f"\n<!-- {marker}:end -->")[0]
    recorded = (ROOT / folder / "accuracy.md").read_text().strip()
    assert table == recorded
    results = json.loads((ROOT / folder / "results.json").read_text())
    defaults = vars(parse_args(argv))
    assert_made_with_the_defaults(results["settings"], defaults)
    assert format_table(results["accuracy"], argparse.Namespace(**defaults)) == recorded
    assert (ROOT / folder / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_readme_serving_and_evaluation_commands_run(tmp_path):
    """The README's `mythos serve` + curl lines (on a free port instead of 8000, the server stopped afterwards) and its
    lm_eval lines, run as written on a toy checkpoint at runs/toy and its export at runs/hub."""
    import json
    import os
    import socket
    import time
    import urllib.request

    import torch
    from conftest import make_model
    from transformers import AutoModelForCausalLM

    from openmythos import MythosTokenizer
    from openmythos.cli import main as mythos

    blocks = [block for block in re.findall(r"```bash\n(.*?)\n```", README, re.S)
              if "mythos serve" in block or "lm_eval " in block]
    assert len(blocks) == 2, blocks
    serve_block, eval_block = ([line.split("  #")[0].strip() for line in block.splitlines()] for block in blocks)
    assert serve_block[0] == '.venv/bin/pip install -e ".[serve,eval]"'
    setup = (ROOT / "setup.py").read_text()
    assert '"serve": [' in setup and '"eval": [' in setup

    runs = tmp_path / "runs"
    make_model("mla", vocab_size=260).save_pretrained(runs / "toy")
    MythosTokenizer().save_pretrained(runs / "toy")
    assert mythos(["export", str(runs / "hub"), "--from", str(runs / "toy")]) == 0
    bindir = Path(sys.executable).parent
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}

    def as_run_here(line, port=None):
        line = re.sub(r"(?<![\w/])\.venv/bin/", f"{bindir}/", line)
        line = re.sub(r"(?<![\w/])examples/", f"{ROOT}/examples/", line)
        return line if port is None else line.replace(":8000", f":{port}").replace("--port 8000", f"--port {port}")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve_line, curl_line = serve_block[1], serve_block[2]
    assert serve_line.endswith("&") and curl_line.startswith("curl ")
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(as_run_here(serve_line[:-1], port), shell=True, cwd=tmp_path, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(600):
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        answer = subprocess.run(as_run_here(curl_line, port), shell=True, capture_output=True, text=True, timeout=300)
        assert answer.returncode == 0, answer.stderr
        completion = json.loads(answer.stdout)
    finally:
        os.killpg(server.pid, 15)  # the shell and the server it started: this test's own process group
        server.wait(timeout=30)
        log.close()
    request = json.loads(re.search(r"-d '(.*)'$", curl_line).group(1))
    loop_options = json.loads(request["generation_config"])
    model = AutoModelForCausalLM.from_pretrained(runs / "toy").eval()
    tokenizer = MythosTokenizer.from_pretrained(runs / "toy")
    ids = tokenizer(request["prompt"], return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**ids, max_new_tokens=request["max_tokens"], do_sample=False, **loop_options)
    assert completion["usage"]["completion_tokens"] == request["max_tokens"]
    assert completion["choices"][0]["text"] == tokenizer.decode(expected[0, ids["input_ids"].shape[1]:],
                                                                skip_special_tokens=True)

    for line in eval_block:
        result = subprocess.run(as_run_here(line), shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, (line, result.stderr[-3000:])
    assert "n_loops': 8" in result.stdout
    for task in ("mythos_cloze", "mythos_next_word", "mythos_corpus"):
        assert f"|{task}" in result.stdout


def test_readme_text_demo_table_is_the_recorded_default_run():
    """README's `--task text` table is docs/demo/text/bpb.md, which the recorded run (results.json beside it) produced
    with the text demo's current default settings."""
    import argparse
    import json

    from openmythos.demo import parse_args
    from openmythos.demo.text import format_table

    folder = ROOT / "docs/demo/text"
    table = README.split("<!-- demo-text-table:start -->\n")[1].split("\n<!-- demo-text-table:end -->")[0]
    recorded = (folder / "bpb.md").read_text().strip()
    assert table == recorded
    results = json.loads((folder / "results.json").read_text())
    defaults = vars(parse_args(["--task", "text"]))
    assert_made_with_the_defaults(results["settings"], defaults)
    assert format_table(results["bpb"], argparse.Namespace(**defaults)) == recorded
    assert (folder / "bpb.png").read_bytes()[:4] == b"\x89PNG"
