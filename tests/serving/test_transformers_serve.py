"""``mythos serve`` (transformers' OpenAI-compatible ``transformers serve`` with the Mythos classes registered): a real
server in a subprocess on 127.0.0.1, sent completions and chat requests through the ``openai`` client, one at a time
and concurrently, some choosing their own loop budget in the request's ``generation_config``. Every answer must be the
text of local greedy ``generate`` on the same checkpoint."""

import concurrent.futures
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from toy_checkpoint import CHAT_TEMPLATE, save_toy_checkpoint
from transformers import AutoModelForCausalLM

from openmythos import MythosTokenizer

PROMPTS = ["The loop ", "Once upon a time", "2 + 2 = ", "abc"]
NEW_TOKENS = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(process: subprocess.Popen, port: int, log: Path, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mythos serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"mythos serve was not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def running_server(checkpoint: Path, log: Path, *options: str):
    """An openai client for ``mythos serve CHECKPOINT`` on 127.0.0.1 and a free port; the server is stopped on exit,
    whatever happened."""
    port = free_port()
    # the console script, as users run it (the package loads lazily there, unlike under `python -m`)
    command = [str(Path(sys.executable).parent / "mythos"), "serve", str(checkpoint),
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_healthy(process, port, log)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module", params=["mla", "gqa"])
def served(request, tmp_path_factory):
    """(openai client, local model, tokenizer, model name) for a checkpoint served by ``mythos serve DIR``."""
    folder = tmp_path_factory.mktemp(f"serve-{request.param}")
    checkpoint = save_toy_checkpoint(folder / "ckpt", request.param, chat_template=CHAT_TEMPLATE)
    with running_server(checkpoint, folder / "server.log") as client:
        model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        yield client, model, MythosTokenizer.from_pretrained(checkpoint), str(checkpoint)


def local_tokens(model, tokenizer, prompt=None, messages=None, **loop_options) -> list[int]:
    if messages is not None:
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **loop_options)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def complete(client, name, prompt, **loop_options):
    extra = {"generation_config": json.dumps(loop_options)} if loop_options else None
    answer = client.completions.create(model=name, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                       extra_body=extra)
    return answer.choices[0].text, answer.usage.completion_tokens


def chat(client, name, messages, **loop_options):
    extra = {"generation_config": json.dumps(loop_options)} if loop_options else None
    answer = client.chat.completions.create(model=name, messages=messages, max_tokens=NEW_TOKENS, temperature=0,
                                            extra_body=extra)
    return answer.choices[0].message.content, answer.usage.completion_tokens


def test_completion_equals_local_greedy_generate(served):
    client, model, tokenizer, name = served
    for prompt in PROMPTS[:2]:
        expected = local_tokens(model, tokenizer, prompt)
        assert complete(client, name, prompt) == (tokenizer.decode(expected), NEW_TOKENS)


def test_chat_equals_local_greedy_generate_over_the_chat_template(served):
    client, model, tokenizer, name = served
    messages = [{"role": "user", "content": "How deep is the loop?"}]
    expected = local_tokens(model, tokenizer, messages=messages)
    assert chat(client, name, messages) == (tokenizer.decode(expected), NEW_TOKENS)


def test_a_request_chooses_its_loop_budget_in_generation_config(served):
    client, model, tokenizer, name = served
    prompt = PROMPTS[0]
    default = local_tokens(model, tokenizer, prompt)
    one_loop = local_tokens(model, tokenizer, prompt, n_loops=1)
    assert one_loop != default  # otherwise this test could not tell whether the budget reached the model
    assert complete(client, name, prompt, n_loops=1)[0] == tokenizer.decode(one_loop)
    assert complete(client, name, prompt)[0] == tokenizer.decode(default)  # the next request is back to the default
    messages = [{"role": "user", "content": prompt}]
    assert chat(client, name, messages, n_loops=2)[0] == tokenizer.decode(
        local_tokens(model, tokenizer, messages=messages, n_loops=2))


def test_concurrent_requests_with_mixed_budgets_each_equal_local_generate(served):
    client, model, tokenizer, name = served
    # (endpoint, prompt, loop options): budgets from 1 to past max_loop_iters, the default, and an exit criterion
    requests = [("completion", PROMPTS[0], {"n_loops": 1}), ("completion", PROMPTS[1], {}),
                ("completion", PROMPTS[2], {"n_loops": 6}), ("chat", PROMPTS[3], {"n_loops": 3}),
                ("completion", PROMPTS[0], {"n_loops": 4, "exit_criterion": "delta", "exit_threshold": 0.5}),
                ("chat", PROMPTS[1], {}), ("completion", PROMPTS[3], {"n_loops": 2}),
                ("chat", PROMPTS[2], {"n_loops": 1})]

    def send(request):
        endpoint, prompt, options = request
        if endpoint == "chat":
            return chat(client, name, [{"role": "user", "content": prompt}], **options)[0]
        return complete(client, name, prompt, **options)[0]

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(send, requests))
    for (endpoint, prompt, options), answer in zip(requests, answers):
        chat_messages = [{"role": "user", "content": prompt}] if endpoint == "chat" else None
        expected = local_tokens(model, tokenizer, None if chat_messages else prompt, chat_messages, **options)
        assert answer == tokenizer.decode(expected), (endpoint, prompt, options)


def test_a_refused_loop_budget_is_a_400_naming_n_loops_and_the_server_goes_on(served):
    client, model, tokenizer, name = served
    with pytest.raises(openai.BadRequestError, match="n_loops"):
        complete(client, name, PROMPTS[0], n_loops=0)
    with pytest.raises(openai.BadRequestError, match="exit_criterion"):
        complete(client, name, PROMPTS[0], exit_criterion="sometimes")
    assert complete(client, name, PROMPTS[0], n_loops=1)[0] == tokenizer.decode(
        local_tokens(model, tokenizer, PROMPTS[0], n_loops=1))


def test_continuous_batching_refuses_a_request_depth_it_would_drop(tmp_path):
    """transformers serve's continuous batching passes each request only max_new_tokens and eos_token_id; a request
    naming its own loop budget is refused with a 400 before any generation, instead of running at another depth."""
    save_toy_checkpoint(tmp_path / "ckpt", "gqa", chat_template=CHAT_TEMPLATE)
    with running_server(tmp_path / "ckpt", tmp_path / "server.log", "--continuous-batching") as client:
        for options in ({"n_loops": 2}, {"exit_criterion": "delta", "exit_threshold": 0.1}):
            with pytest.raises(openai.BadRequestError, match="continuous-batching") as refused:
                complete(client, str(tmp_path / "ckpt"), PROMPTS[0], **options)
            assert next(iter(options)) in str(refused.value)


def test_a_missing_checkpoint_folder_is_one_line_before_anything_loads(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    result = subprocess.run([str(Path(sys.executable).parent / "mythos"), "serve", str(missing), "--port", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"mythos serve: error: {str(missing)!r} is not a folder; pass a save_pretrained folder (with its tokenizer) "
        f"or a Hub repo id"]


def test_bad_serve_arguments_are_named_without_starting(tmp_path, capsys):
    from openmythos.serving import serve

    assert serve(["--port", "8000", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"mythos serve: error: {str(tmp_path / 'nope')!r} is not a folder; " \
                                              f"pass a save_pretrained folder (with its tokenizer) or a Hub repo id"
    assert serve([str(tmp_path), "--port", "99999"]) == 2
    assert capsys.readouterr().err.strip() == "mythos serve: error: --port must be from 1 to 65535, got 99999"


@pytest.mark.parametrize("argv, message", [
    (["--port=0"], "--port must be from 1 to 65535, got 0"),
    (["--model-timeout", "-5"], "--model-timeout must be -1 (never unload) or a number of seconds >= 0, got -5"),
    (["--cb-max-memory-percent", "5"], "--cb-max-memory-percent must be a fraction in (0, 1], got 5"),
    (["--cb-max-memory-percent=nan"], "--cb-max-memory-percent must be a fraction in (0, 1], got nan"),
    (["--cb-block-size", "0"], "--cb-block-size must be an integer >= 1, got 0"),
    (["--cb-num-blocks", "-3"], "--cb-num-blocks must be an integer >= 1, got -3"),
    (["--cb-max-batch-tokens", "0"], "--cb-max-batch-tokens must be an integer >= 1, got 0"),
])
def test_numeric_options_transformers_takes_unchecked_are_refused_in_one_line(tmp_path, capsys, argv, message):
    """transformers' serve accepted these and misbehaved later (a negative idle timeout, 500% of the memory)."""
    from openmythos.serving import _argument_problem, serve

    assert serve([str(tmp_path), *argv]) == 2
    assert capsys.readouterr().err.strip() == f"mythos serve: error: {message}"
    for fine in (["--model-timeout", "-1"], ["--model-timeout=0"], ["--cb-max-memory-percent", "0.5"],
                 ["--cb-block-size", "32"], ["--port", "8000"]):
        assert _argument_problem([str(tmp_path), *fine]) is None, fine
