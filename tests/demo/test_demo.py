"""The reasoning demo: its task generator, and the whole pipeline end to end at toy size."""

import json
import math
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openmythos import MythosTokenizer, demo
from openmythos.demo.tasks import HOP_MARK, InContextPointerChasingTask, PointerChasingTask

ROOT = Path(__file__).resolve().parents[2]


def test_hidden_links_form_one_cycle_through_every_node():
    task = PointerChasingTask(num_nodes=12, seed=3)
    node, seen = "a", []
    for _ in range(12):
        seen.append(node)
        node = task.successor[node]
    assert node == "a" and sorted(seen) == sorted(task.nodes)


def test_every_hop_count_below_the_cycle_length_has_a_different_answer():
    task = PointerChasingTask(num_nodes=10, seed=0)
    for start in task.nodes:
        answers = [task.follow(start, k) for k in range(1, 10)]
        assert len(set(answers)) == 9 and start not in answers
        assert task.follow(start, 10) == start


def test_answer_is_the_composition_of_single_hops():
    task = PointerChasingTask(num_nodes=20, seed=5)
    for start in task.nodes:
        assert task.follow(start, 5) == task.follow(task.follow(start, 2), 3)
        assert task.question(start, 5) == start + HOP_MARK * 5
        assert task.trace(start, 5) == "".join([start] + [task.follow(start, j) for j in range(1, 6)])


def test_task_is_deterministic_for_a_seed_and_differs_across_seeds():
    assert PointerChasingTask(seed=1).successor == PointerChasingTask(seed=1).successor
    assert PointerChasingTask(seed=1).successor != PointerChasingTask(seed=2).successor
    one = PointerChasingTask(seed=1).examples(range(1, 5), 50, seed=7)
    assert one == PointerChasingTask(seed=1).examples(range(1, 5), 50, seed=7)
    assert {row["hops"] for row in one} == {1, 2, 3, 4}


def test_dataset_rows_label_every_mark_with_its_intermediate_node():
    tokenizer = MythosTokenizer()
    task = PointerChasingTask(num_nodes=8, seed=0)
    data = task.dataset(tokenizer, [2, 3], num_examples=40, seed=0, pack=3)
    assert len(data) == 40 and set(data.column_names) >= {"input_ids", "labels", "depths", "hops", "question"}
    packed = set()
    for row in data:
        text, ids, labels, depths = row["question"], row["input_ids"], row["labels"], row["depths"]
        questions = re.findall(rf"[a-z]\{HOP_MARK}+", text)
        assert "".join(questions) == text and 1 <= len(questions) <= 3
        assert {len(q) - 1 for q in questions} <= {2, 3} and row["hops"] == max(len(q) - 1 for q in questions)
        packed.add(len(questions))
        assert ids[:-1] == tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == len(labels) == len(depths) == len(text) + 1 and labels[0] == -100 and depths[-1] == -1
        position = 0
        for q in questions:
            start = q[0]
            for j in range(len(q)):
                # the logits at position p learn labels[p + 1]: the node j links after the question's start
                expected = start if j == 0 else task.follow(start, j)
                assert tokenizer.decode([labels[position + 1]]) == expected and depths[position] == j
                position += 1
        # the last mark's label is the row's last answer, which is also the row's last input token
        assert ids[-1] == labels[-1] and tokenizer.decode([ids[-1]]) == task.follow(questions[-1][0],
                                                                                     len(questions[-1]) - 1)
    assert packed == {1, 2, 3}
    assert task.dataset(tokenizer, [1], 5, seed=0)["question"] == [row["question"] for row in task.dataset(
        tokenizer, [1], 5, seed=0, pack=1)]


def test_trace_targets_move_each_mark_one_hop_per_loop_and_then_hold_it():
    from openmythos.demo.pipeline import trace_targets

    tokenizer = MythosTokenizer()
    task = PointerChasingTask(num_nodes=12, seed=4)
    row = task.dataset(tokenizer, [3, 4], num_examples=1, seed=2, pack=1)[0]
    labels, depths = torch.tensor([row["labels"]]), torch.tensor([row["depths"]])
    start, k = row["question"][0], row["hops"]
    for loops in range(1, k + 3):
        targets = trace_targets(labels, depths, loops)[0]
        assert targets[0] == -100 and torch.equal(trace_targets(labels, depths, k)[0], labels[0])
        for j in range(k + 1):
            # after t loops the j-th mark should hold the node min(j, t) links on
            hops_done = min(j, loops)
            assert tokenizer.decode([targets[j + 1]]) == (task.follow(start, hops_done) if hops_done else start)


def test_exit_rule_evaluation_passes_no_hop_count():
    """Under the exit rule every question runs the same budget, whatever its hop count."""
    import argparse

    from openmythos.demo import pipeline

    tokenizer = MythosTokenizer()
    args = argparse.Namespace(train_hops=2, eval_hops=4, max_loops=3, dim=32, heads=2, seed=0, exit_budget=7)
    task = PointerChasingTask(num_nodes=8, seed=0)
    models = pipeline.build_models(args, tokenizer, task)
    calls = []
    for name, model in models.items():
        forward = model.forward

        def recording(*a, _forward=forward, _name=name, **kw):
            calls.append((_name, kw.get("n_loops"), kw.get("exit_criterion"), kw["input_ids"].shape[1] - 1))
            return _forward(*a, **kw)

        model.forward = recording
    rule = pipeline.choose_exit_threshold(models["looped"], task.exit_questions(args), tokenizer, 7)
    assert set(rule) >= {"threshold", "budget", "separated"} and rule["threshold"] > 0 and rule["budget"] == 7
    # a quarter of the way from the largest settled value to the smallest moving one, on a log scale (the KL is
    # NaN at the first loop, which has no previous loop: left out, so both ends are numbers)
    settled, moving = rule["largest_change_once_settled"], rule["smallest_change_while_moving"]
    assert math.isfinite(settled) and math.isfinite(moving) and rule["criterion"] == "kl"
    assert rule["threshold"] == pytest.approx(settled ** 0.75 * moving ** 0.25)
    # the threshold is chosen on training questions only (1..K hops)
    assert {hops for _, _, _, hops in calls} == {1, 2}
    calls.clear()
    table = pipeline.evaluate(models, task, tokenizer, args, rule)
    exit_calls = [call for call in calls if call[2] is not None]
    assert [hops for *_, hops in exit_calls] == [1, 2, 3, 4]
    assert all(name == "looped" and n_loops == 7 and criterion == "kl" for name, n_loops, criterion, _ in exit_calls)
    assert all(n_loops is None for name, n_loops, _, _ in calls if name != "looped")
    assert all(1 <= loops <= 7 for loops in table["looped@exit:mean_loops"]) and len(table["looped@exit"]) == 4


@pytest.mark.parametrize("kwargs, match", [
    ({"num_nodes": 1}, "num_nodes"), ({"num_nodes": 53}, "num_nodes"), ({"num_nodes": 4.0}, "num_nodes"),
])
def test_bad_task_settings_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PointerChasingTask(**kwargs)


@pytest.mark.parametrize("hops", [0, -1, 2.5, True])
def test_bad_hop_counts_are_refused(hops):
    with pytest.raises(ValueError, match="hop counts"):
        PointerChasingTask().follow("a", hops)


@pytest.mark.parametrize("argv, flag", [
    (["--pack", "0"], "--pack"), (["--extra-loops", "-1"], "--extra-loops"), (["--exit-budget", "0"], "--exit-budget"),
    (["--pack", "20"], "--pack"), (["--task", "context", "--pack", "2"], "--pack"),
    (["--task", "context", "--exit-budget", "9"], "--exit-budget"),
    (["--task", "context", "--exit-criterion", "kl"], "--exit-criterion"),
    (["--exit-criterion", "act"], "--exit-criterion"),
    # once silently replaced by a default (0 read as "not given") or accepted and run wrongly or into a traceback
    (["--max-loops", "0"], "--max-loops"), (["--eval-hops", "0"], "--eval-hops"),
    (["--baseline-steps", "-5"], "--baseline-steps"), (["--samples", "-3"], "--samples"),
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--threads", "0"], "--threads"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2**32)], "--seed"), (["--num-nodes", "100"], "--num-nodes"),
    (["--task", "context", "--num-nodes", "60"], "--num-nodes"),
    (["--max-loops", "100000"], "--max-loops"), (["--train-hops", "1", "--exit-budget", "9"], "--exit-budget"),
    (["--state-noise", "-0.1"], "--state-noise"), (["--state-noise", "nan"], "--state-noise"),
    (["--task", "context", "--state-noise", "0.1"], "--state-noise"),
    (["--arrival-weight", "0"], "--arrival-weight"), (["--arrival-weight", "inf"], "--arrival-weight"),
    (["--task", "context", "--arrival-weight", "4"], "--arrival-weight"),
    (["--moving-weight", "-1"], "--moving-weight"), (["--task", "context", "--moving-weight", "4"], "--moving-weight"),
    (["--exit-scope", "whole"], "--exit-scope"), (["--task", "context", "--exit-scope", "prefix"], "--exit-scope"),
    (["--task", "context", "--loop-state-norm"], "--loop-state-norm"),
])
def test_demo_refuses_bad_convergent_depth_flags_naming_them(argv, flag, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(argv)
    assert flag in capsys.readouterr().err


def test_exit_scope_flag_reaches_the_looped_models_config():
    from openmythos.demo.pipeline import looped_config
    tokenizer = MythosTokenizer()
    assert looped_config(demo.parse_args([]), tokenizer, 16).exit_scope == "row"
    assert looped_config(demo.parse_args(["--exit-scope", "position"]), tokenizer, 16).exit_scope == "position"
    assert looped_config(demo.parse_args(["--task", "context"]), tokenizer, 16).exit_scope == "position"


def test_loop_state_norm_flag_reaches_the_looped_models_config():
    from openmythos.demo.pipeline import looped_config
    tokenizer = MythosTokenizer()
    assert looped_config(demo.parse_args(["--loop-state-norm"]), tokenizer, 16).loop_state_norm is True
    assert looped_config(demo.parse_args([]), tokenizer, 16).loop_state_norm is False


def test_defaulted_depths_fit_a_small_training_depth():
    """With --train-hops 1 the looped model runs at most 8 loops: the default budgets of 16 shrink to fit, instead of
    failing after training."""
    args = demo.parse_args(["--train-hops", "1"])
    assert (args.exit_budget, args.max_loops) == (8, 8)


def test_demo_defaults_train_the_hidden_task_with_packed_rows_and_score_16_loops():
    args = demo.parse_args([])
    assert (args.pack, args.extra_loops, args.exit_budget, args.max_loops) == (3, 4, 16, 16)
    assert args.exit_criterion == "kl" and args.state_noise is None
    context = demo.parse_args(["--task", "context"])
    assert (context.pack, context.extra_loops, context.exit_budget, context.max_loops) == (None, None, None, 10)


def test_demo_rejects_eval_depths_that_wrap_around_the_cycle():
    result = subprocess.run([sys.executable, "-m", "openmythos.demo", "--num-nodes", "6", "--eval-hops", "6"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--eval-hops" in result.stderr


TOY_DEMO = ["--train-hops", "2", "--num-nodes", "8", "--dim", "32", "--heads", "2", "--steps", "12",
            "--baseline-steps", "6", "--batch-size", "16", "--train-examples", "200", "--samples", "2",
            "--max-loops", "6", "--exit-budget", "8"]


def _run_demo(out, *extra):
    result = subprocess.run([sys.executable, "-m", "openmythos.demo", *TOY_DEMO, "--output-dir", str(out), *extra],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def toy_demo(tmp_path_factory):
    """One toy run of the hidden-graph demo, into an output folder that already holds a file of the user's."""
    out = tmp_path_factory.mktemp("toy") / "demo"
    out.mkdir()
    (out / "my-notes.txt").write_text("mine")
    # the folder is not the demo's (no marker): it writes there only when told to; the dense baselines train in a
    # second process
    return out, _run_demo(out, "--jobs", "2", "--overwrite")


@pytest.mark.parametrize("task", [[], ["--task", "text"]])
def test_an_output_folder_holding_the_users_files_is_refused_without_overwrite(tmp_path, task):
    """The demo replaces its own file names in --output-dir (results.json, accuracy.md, ...): in a folder an earlier
    run did not mark as the demo's, that needs --overwrite. A file given as the folder is refused too."""
    from openmythos.cli import main

    from openmythos.demo import parse_args
    from openmythos.demo.flags import output_problem

    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.json").write_text("my own results")
    assert main(["demo", *task, "--output-dir", str(out)]) == 2
    assert demo.main([*task, "--output-dir", str(out)]) == 2  # python -m openmythos.demo
    assert (out / "results.json").read_text() == "my own results" and not (out / ".mythos-demo").exists()
    assert main(["demo", *task, "--output-dir", str(out / "results.json")]) == 2
    assert output_problem(parse_args([*task, "--output-dir", str(out), "--overwrite"])) is None
    (out / "results.json").unlink()
    (out / ".mythos-demo").write_text("")  # an earlier run's folder: no --overwrite needed
    (out / "results.json").write_text("an earlier run's results")
    assert output_problem(parse_args([*task, "--output-dir", str(out)])) is None
    # the text demo's default folder inside the other tasks' (demo_output/text in demo_output) is the demo's too
    parent = tmp_path / "demo_output"
    (parent / "text").mkdir(parents=True)
    (parent / "text" / ".mythos-demo").write_text("")
    assert output_problem(parse_args(["--output-dir", str(parent)])) is None


def test_demo_runs_end_to_end_at_toy_size(toy_demo):
    out, result = toy_demo
    results = json.loads((out / "results.json").read_text())
    assert results["hops"] == [1, 2, 3, 4]
    table = results["accuracy"]
    expected_columns = {f"looped@{n}" for n in range(1, 7)} | {"looped@hops", "looped@exit", "dense_same_params",
                                                                "dense_same_compute"}
    loops = table.pop("looped@exit:mean_loops")
    assert set(table) == expected_columns
    for column in table.values():
        assert len(column) == 4 and all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in column)
    # the exit rule's mean loops at the answer position, over the 8 start nodes, within the budget of 8
    assert len(loops) == 4 and all(1.0 <= n <= 8.0 and abs(n * 8 - round(n * 8)) < 1e-6 for n in loops)
    rule = results["exit_rule"]
    assert rule["criterion"] == "kl" and rule["budget"] == 8 and rule["threshold"] > 0
    assert ("Exit rule: a position stops once its KL divergence between its successive next-token distributions is "
            "below") in result.stdout
    # the looped column at n_loops=hops is the diagonal of the per-n_loops columns
    assert table["looped@hops"] == [table[f"looped@{k}"][k - 1] for k in range(1, 5)]
    assert set(results["summary"]) >= {"looped_in_distribution", "dense_same_params_at_eval_hops"}
    # every model's answer set is scored over all 8 start nodes, so accuracies are multiples of 1/8
    assert all(abs(a * 8 - round(a * 8)) < 1e-6 for column in table.values() for a in column)
    markdown = (out / "accuracy.md").read_text()
    assert markdown.count("\n") == 2 + 4 and "(held out)" in markdown
    assert markdown.startswith("| hops | exit rule (no hop count) | exit rule: mean loops | n_loops >= hops: lowest |")
    lowest = [min(table[f"looped@{n}"][k - 1] for n in range(k, 7)) for k in range(1, 5)]
    assert [line.split(" | ")[3] for line in markdown.splitlines()[2:]] == [f"{a * 100:.0f}%" for a in lowest]
    png = (out / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "looped-model" / "model.safetensors").exists()
    # the samples are answered with the exit rule, no n_loops given
    assert len(results["samples"]) == 2 and all("n_loops" not in s and 1 <= s["loops_used"] <= 8
                                                for s in results["samples"])
    assert [s["question"] for s in results["samples"]] == [s["question"][0] + HOP_MARK * s["hops"]
                                                           for s in results["samples"]]
    assert "Sample questions, answered by the reloaded model" in result.stdout
    params = results["parameters"]
    assert abs(params["dense_same_params"] - params["looped"]) / params["looped"] < 0.35


def test_wave_record_agrees_with_the_accuracy_table_where_the_wave_has_arrived(toy_demo):
    """results.json's per-mark, per-loop record: a causal model's mark j of the deepest question is the last mark of
    the j-hop question, so once t >= j its cell is the fixed-loop table's; before, it is whether the mark holds the
    wave front, which no table shows."""
    out, _ = toy_demo
    results = json.loads((out / "results.json").read_text())
    marks, table = results["wave"], results["accuracy"]
    assert marks["hops"] == 4 and len(marks["right"]) == 4 and all(len(row) == 6 for row in marks["right"])
    for j, row in enumerate(marks["right"], start=1):
        assert all(0.0 <= share <= 1.0 and abs(share * 8 - round(share * 8)) < 1e-6 for share in row)
        assert row[j - 1:] == [table[f"looped@{t}"][j - 1] for t in range(j, 7)], j
    # the toy model's columns barely differ, so check the readout itself: loop t's state of the 4-hop question,
    # read at mark j, gives the logits of the model's own forward on the j-hop question with n_loops=t
    from transformers import AutoModelForCausalLM

    from openmythos.demo.pipeline import loop_states, read_out

    model = AutoModelForCausalLM.from_pretrained(out / "looped-model").eval()
    tokenizer = MythosTokenizer()
    ids = torch.tensor([tokenizer.encode(PointerChasingTask(8, 0).question(x, 4), add_special_tokens=False)
                        for x in "abc"])
    with torch.no_grad():
        hidden = model.model(input_ids=ids, n_loops=6, output_hidden_states=True, use_cache=False).hidden_states
        states = loop_states(model, hidden, 6)
        for t in (1, 3, 6):
            logits = read_out(model, states[t - 1])
            for j in (1, 2, 4):
                alone = model(input_ids=ids[:, :j + 1], n_loops=t, use_cache=False).logits[:, -1]
                torch.testing.assert_close(logits[:, j], alone, rtol=1e-4, atol=1e-4)


def test_saved_demo_model_names_its_task_and_exit_rule(toy_demo):
    out, _ = toy_demo
    results = json.loads((out / "results.json").read_text())
    described = json.loads((out / "looped-model" / "demo_task.json").read_text())
    assert described == {"task": "hidden", "num_nodes": 8, "seed": 0, "train_hops": 2, "eval_hops": 4,
                         "exit_rule": results["exit_rule"]}


def test_adaptive_depth_benchmark_scores_the_demo_model_by_accuracy(toy_demo, tmp_path):
    """benchmarks/adaptive_depth.py on the saved demo model: accuracy against the model's own budget, and at the
    demo's exit threshold exactly the demo's own exit-rule accuracy and loops."""
    out, _ = toy_demo
    results = json.loads((out / "results.json").read_text())
    report = tmp_path / "adaptive.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adaptive_depth.py"), "--quick", "--model",
                             str(out / "looped-model"), "--json", str(report)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| fixed (n_loops=8) |" in result.stdout and "on pointer chasing" in result.stdout
    data = json.loads(report.read_text())
    assert data["budget"] == 8 and data["eval"]["hops"] == [1, 2, 3, 4]
    assert data["fixed"]["mean_loops"] == 8 and data["fixed"]["answer_loops_by_hops"] == [8, 8, 8, 8]
    assert set(data["criteria"]) == {"delta", "kl"} and set(data["skipped"]) == {"act"}  # no halting head
    criterion, chosen = results["exit_rule"]["criterion"], results["exit_rule"]["threshold"]
    # --quick: each criterion's first default threshold, plus the demo's own for its criterion
    assert [r["threshold"] for r in data["criteria"]["delta"]] == [0.5]
    assert [r["threshold"] for r in data["criteria"][criterion]] == sorted({1e-2, chosen}, reverse=True)
    for name, rows in data["criteria"].items():
        for row in rows:
            # 8 start nodes per hop count: accuracies are multiples of 1/8
            assert all(abs(a * 8 - round(a * 8)) < 1e-6 for a in row["accuracy_by_hops"]), (name, row)
            assert 1 <= row["mean_loops"] <= 8 and row["loop_saving"] == pytest.approx(1 - row["mean_loops"] / 8)
            assert row["accuracy_change"] == pytest.approx(row["accuracy"] - data["fixed"]["accuracy"])
            for workload in ("forward", "generate"):
                timing = row[workload]
                assert timing["ratio"] > 0 and len(timing["ratio_by_hops"]) == 4, (name, workload, timing)
            assert set(row["missed"]) <= {"loops", "accuracy", "forward time", "generate time"}
    at_demo = next(r for r in data["criteria"][criterion] if r["threshold"] == chosen)
    assert at_demo["accuracy_by_hops"] == pytest.approx(results["accuracy"]["looped@exit"])
    assert at_demo["answer_loops_by_hops"] == pytest.approx(results["accuracy"]["looped@exit:mean_loops"])
    assert data["verdicts"]["act"] == {"met": None, "threshold": None,
                                       "line": "act: not run (the model has no halting head (use_act=False))"}
    for name in ("delta", "kl"):
        verdict = data["verdicts"][name]
        assert verdict["line"].startswith(name) and verdict["met"] == (verdict["threshold"] is not None)


def test_demo_console_shows_one_summary_line_per_model_and_no_raw_log_dicts(toy_demo):
    out, result = toy_demo
    assert "{'" not in result.stdout and "'loss'" not in result.stdout and "train_runtime" not in result.stdout
    assert not re.search(r"\binf\b", result.stdout)  # the raw logs held moe/load_max_min_ratio: inf
    number = r"\d+\.\d{3}"
    assert re.search(rf"^  looped: 12 steps in \d+ s, loss {number} -> {number}, expert load CV \d+\.\d\d at the "
                     r"last step \(std/mean of tokens per expert, 0 = even(; an expert got no token)?\)$",
                     result.stdout, re.M)
    for name in ("dense_same_params", "dense_same_compute"):
        assert re.search(rf"^  {name}: 6 steps in \d+ s, loss {number} -> {number}$", result.stdout, re.M)
    assert "it/s]" in result.stderr  # the progress bars stay
    training = json.loads((out / "results.json").read_text())["training"]
    assert [training[name]["steps"] for name in ("looped", "dense_same_params", "dense_same_compute")] == [12, 6, 6]
    assert 0.0 <= training["looped"]["expert_load_cv"] < 2.0 and "expert_load_cv" not in training["dense_same_params"]
    assert all(record["first_loss"] > 0 and record["last_loss"] > 0 for record in training.values())


def test_demo_records_and_prints_what_its_numbers_depend_on(toy_demo):
    out, result = toy_demo
    env = json.loads((out / "results.json").read_text())["environment"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] == 1  # --threads defaults to 1
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["platform"] == platform.platform() and env["device"] == "cpu"
    assert f"Seed 0; torch {torch.__version__}, 1 CPU thread(s), {env['cpu_capability']} kernels" in result.stdout


def test_demo_leaves_the_users_files_and_no_temporaries_in_its_output_folder(toy_demo):
    out, _ = toy_demo
    assert (out / "my-notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == [".mythos-demo", "accuracy.md", "accuracy.png", "looped-model",
                                                     "my-notes.txt", "results.json", "trainer"]


def test_rerun_with_the_same_seed_on_the_same_machine_gives_the_same_numbers(toy_demo, tmp_path):
    """Also in one process: training the dense baselines in a second process (--jobs 2) changes nothing."""
    first_out, first_run = toy_demo
    out = tmp_path / "demo"
    shutil.copytree(first_out, out)  # rerun over a finished run: the model folder is replaced, not merged
    first = json.loads((first_out / "results.json").read_text())
    assert "(in a second process)" in first_run.stdout and first["settings"]["jobs"] == 2
    _run_demo(out, "--jobs", "1")
    again = json.loads((out / "results.json").read_text())
    assert again["accuracy"] == first["accuracy"] and again["samples"] == first["samples"]
    for name, record in first["training"].items():
        assert (again["training"][name]["first_loss"], again["training"][name]["last_loss"]) == (
            record["first_loss"], record["last_loss"])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in first_out.iterdir())
    assert (out / "looped-model" / "model.safetensors").read_bytes() == (
        first_out / "looped-model" / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------------------ the demo's writes
def _tree(folder):
    return {str(f.relative_to(folder)): f.read_text() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_a_crash_while_writing_a_result_file_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")

    def crash(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        demo.write_atomically(path, crash)
    assert _tree(tmp_path) == {"results.json": "old"}
    demo.write_text_atomically(path, "new")
    assert _tree(tmp_path) == {"results.json": "new"}


def test_a_crash_while_saving_the_model_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "looped-model"
    folder.mkdir()
    (folder / "model.safetensors").write_text("old weights")

    def crash(tmp):
        tmp.mkdir()
        (tmp / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        demo.save_folder_atomically(folder, crash)
    assert _tree(tmp_path) == {"looped-model/model.safetensors": "old weights"}


def _save(files):
    def save(tmp):
        tmp.mkdir()
        for name, text in files.items():
            (tmp / name).write_text(text)
    return save


def test_a_swap_cut_between_its_renames_is_finished_by_the_next_save(tmp_path):
    folder = tmp_path / "looped-model"
    # the crash came after the old folder was moved aside and before the new one was moved in
    (tmp_path / ".looped-model.old").mkdir()
    (tmp_path / ".looped-model.old" / "model.safetensors").write_text("old weights")
    (tmp_path / ".looped-model.tmp").mkdir()
    (tmp_path / ".looped-model.tmp" / "model.safetensors").write_text("maybe half")
    assert demo.recover_folder(folder) is None
    assert _tree(tmp_path) == {"looped-model/model.safetensors": "old weights"}
    # the crash came after the new folder was moved in and before the old one was deleted
    (tmp_path / ".looped-model.old").mkdir()
    (tmp_path / ".looped-model.old" / "model.safetensors").write_text("older weights")
    assert demo.save_folder_atomically(folder, _save({"model.safetensors": "new weights"})) is None
    assert _tree(tmp_path) == {"looped-model/model.safetensors": "new weights"}


def test_saving_over_a_model_folder_with_the_users_files_keeps_them(tmp_path):
    folder = tmp_path / "looped-model"
    _save({"model.safetensors": "old weights", "my-notes.txt": "mine"})(folder)
    kept = demo.save_folder_atomically(folder, _save({"model.safetensors": "new weights"}))
    assert kept == tmp_path / "looped-model.previous"
    assert _tree(tmp_path) == {"looped-model/model.safetensors": "new weights",
                               "looped-model.previous/model.safetensors": "old weights",
                               "looped-model.previous/my-notes.txt": "mine"}
    assert demo.save_folder_atomically(folder, _save({"model.safetensors": "newer"})) is None  # only demo files
    assert demo.save_folder_atomically(folder, _save({"model.safetensors": "newest"})) is None
    assert _tree(tmp_path)["looped-model/model.safetensors"] == "newest" and len(_tree(tmp_path)) == 3


# ------------------------------------------------------------------------------------------- in-context pointer chasing
def _links(context: str) -> dict[str, str]:
    edges = context.split("|")[0].split(" ")
    return {edge[0]: edge[2] for edge in edges}


def _follow(links, node, hops):
    for _ in range(hops):
        node = links[node]
    return node


def test_in_context_task_is_deterministic_for_a_seed_and_differs_across_seeds():
    task = InContextPointerChasingTask(max_nodes=9, seed=1)
    one = task.examples(range(1, 5), 40, group_size=8)
    assert one == InContextPointerChasingTask(max_nodes=9, seed=1).examples(range(1, 5), 40, group_size=8)
    assert one != InContextPointerChasingTask(max_nodes=9, seed=2).examples(range(1, 5), 40, group_size=8)
    assert task.eval_examples(3, 20) == InContextPointerChasingTask(max_nodes=9, seed=1).eval_examples(3, 20)
    assert task.eval_examples(3, 20) != task.eval_examples(3, 20, seed=5)


def test_in_context_prompts_write_one_cycle_and_vary_its_size_within_bounds():
    task = InContextPointerChasingTask(max_nodes=8, seed=0)
    rows = task.examples(range(1, 4), 300, seed=3, group_size=10)
    sizes = {row["num_nodes"] for row in rows}
    assert min(sizes) >= 3 and max(sizes) <= 8 and len(sizes) > 3
    for i, row in enumerate(rows):
        links = _links(row["context"])
        assert len(links) == row["num_nodes"] >= max(3, row["hops"] + 1)
        assert set(links) == set(links.values()) <= set("abcdefgh")
        assert _follow(links, next(iter(links)), row["num_nodes"]) == next(iter(links))  # one cycle through all
        assert len({_follow(links, "".join(links)[0], k) for k in range(row["num_nodes"])}) == row["num_nodes"]
        assert row["context"].endswith("|" + HOP_MARK * row["hops"])
        assert sorted(row["queries"]) == sorted(links)  # every node is queried once
        assert row["answers"] == "".join(_follow(links, q, row["hops"]) for q in row["queries"])
        first = rows[i - i % 10]  # a group shares its hop count and graph size
        assert (row["hops"], row["num_nodes"]) == (first["hops"], first["num_nodes"])


def test_in_context_labels_hold_each_query_answer_one_position_after_it():
    tokenizer = MythosTokenizer()
    task = InContextPointerChasingTask(max_nodes=7, seed=0)
    data = task.dataset(tokenizer, [1, 2, 3], num_examples=30, seed=0, group_size=5)
    assert len(data) == 30 and set(data.column_names) >= {"input_ids", "labels", "hops", "num_nodes", "context",
                                                           "queries", "answers"}
    for row in data:
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels) and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == row["context"] + row["queries"]
        start = len(tokenizer.encode(row["context"], add_special_tokens=False))
        links = _links(row["context"])
        for j, query in enumerate(row["queries"]):
            assert tokenizer.decode([ids[start + j]]) == query
            # causal-LM labels are shifted by one: the logits at the query predict labels[position + 1]
            assert tokenizer.decode([labels[start + j + 1]]) == _follow(links, query, row["hops"])
        assert sum(label != -100 for label in labels) == row["num_nodes"]


def test_in_context_eval_prompts_are_single_queries_over_full_size_graphs():
    task = InContextPointerChasingTask(max_nodes=9, seed=0)
    for hops in (1, 4, 8):
        rows = task.eval_examples(hops, 50)
        assert len(rows) == 50 and len({row["question"] for row in rows}) > 40
        for row in rows:
            context, question = row["question"].split("|")
            assert question == HOP_MARK * hops + question[-1] and len(_links(context + "|")) == 9
            assert row["answer"] == _follow(_links(context + "|"), question[-1], hops) and row["hops"] == hops


@pytest.mark.parametrize("call, match", [
    (lambda: InContextPointerChasingTask(max_nodes=2), "max_nodes"),
    (lambda: InContextPointerChasingTask(max_nodes=53), "max_nodes"),
    (lambda: InContextPointerChasingTask(max_nodes=5).examples([5], 3), "at least 6 nodes"),
    (lambda: InContextPointerChasingTask(max_nodes=5).eval_examples(0, 3), "hop counts"),
    (lambda: InContextPointerChasingTask().examples([], 3), "at least one"),
    (lambda: InContextPointerChasingTask().examples([1], 3, group_size=0), "group_size"),
])
def test_bad_in_context_settings_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_context_demo_runs_end_to_end_at_toy_size(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "openmythos.demo", "--task", "context", "--train-hops", "2", "--num-nodes", "5",
         "--dim", "32", "--heads", "2", "--steps", "12", "--baseline-steps", "6", "--batch-size", "8",
         "--curriculum-steps", "4", "--eval-examples", "20", "--samples", "2", "--no-plot", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["task"] == "context" and results["hops"] == [1, 2, 3, 4]
    table = results["accuracy"]
    assert set(table) == {f"looped@{n}" for n in range(1, 7)} | {"looped@hops", "dense_same_params",
                                                                  "dense_same_compute"}
    for column in table.values():  # 20 prompts per hop count
        assert len(column) == 4 and all(0.0 <= a <= 1.0 and abs(a * 20 - round(a * 20)) < 1e-6 for a in column)
    assert all(isinstance(v, float) for v in results["summary"].values())
    assert (out / "accuracy.md").read_text().count("\n") == 2 + 4
    assert (out / "looped-model" / "model.safetensors").exists()
    assert len(results["samples"]) == 2 and all("|" in s["question"] for s in results["samples"])


def test_context_demo_rejects_eval_depths_that_wrap_around_the_cycle():
    result = subprocess.run([sys.executable, "-m", "openmythos.demo", "--task", "context", "--num-nodes", "6",
                             "--eval-hops", "6"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--eval-hops" in result.stderr


def test_state_noise_perturbs_the_training_loop_only_from_its_own_generator(tmp_path):
    """The hook adds noise of the given size relative to each position's RMS to every loop's new state in training;
    in evaluation the loop is untouched. Two trainers draw the same noise (its generator does not follow --seed)."""
    from transformers import TrainingArguments

    from openmythos.demo.pipeline import TraceTrainer, looped_config

    args = demo.parse_args(["--dim", "32", "--heads", "2", "--train-hops", "2"])
    tokenizer = MythosTokenizer()
    ids = torch.tensor([tokenizer.encode("a++b+", add_special_tokens=False)])

    from openmythos.demo.pipeline import collate

    task = PointerChasingTask(8, seed=0)
    rows = task.dataset(tokenizer, hops=[1, 2], num_examples=4, seed=0, pack=2)
    batch = collate([dict(row) for row in rows], tokenizer.pad_token_id, with_depths=True)

    def run(noise, tmp):
        """One training step's loss through TraceTrainer.compute_loss, then the loop states of a training-mode and
        an evaluation-mode forward."""
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(looped_config(args, tokenizer, 16)).train()
        trainer = TraceTrainer(model=model, args=TrainingArguments(output_dir=str(tmp), report_to="none"),
                               extra_loops=1, loop_seed=0, state_noise=noise)
        loss = trainer.compute_loss(model, dict(batch))  # the first step adds the hook
        with torch.no_grad():
            states = {mode: torch.stack(model.train(mode).model(
                input_ids=ids, n_loops=3, output_hidden_states=True, use_cache=False).hidden_states[2:5])
                for mode in (True, False)}
        return loss.detach(), states

    clean_loss, clean = run(0.0, tmp_path / "a")
    noisy_loss, noisy = run(0.1, tmp_path / "b")
    again_loss, again = run(0.1, tmp_path / "c")
    assert noisy_loss != clean_loss and torch.equal(noisy_loss, again_loss)  # noise, the same draws each run
    relative = (noisy[True] - clean[True]).pow(2).mean(-1).sqrt() / clean[True].pow(2).mean(-1).sqrt()
    assert 0.02 < relative[0].mean() < 0.3  # the first loop's state moved by about 0.1 of its size
    assert torch.equal(noisy[False], clean[False])  # evaluation: no noise


def test_arrival_and_moving_weights_scale_exactly_the_loss_of_those_marks(tmp_path):
    """The loss is (sum over labels of the cross-entropy, the arriving mark's times the arrival weight, every moving
    mark's times the moving weight) / number of labels; weights of 1 give the plain mean. Checked against a per-token
    recomputation of one step."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from openmythos.demo.pipeline import TraceTrainer, collate, looped_config, loop_states, read_out, trace_targets

    args = demo.parse_args(["--dim", "32", "--heads", "2", "--train-hops", "3"])
    tokenizer = MythosTokenizer()
    rows = PointerChasingTask(8, seed=0).dataset(tokenizer, hops=[1, 2, 3], num_examples=6, seed=0, pack=2)
    batch = collate([dict(row) for row in rows], tokenizer.pad_token_id, with_depths=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(looped_config(args, tokenizer, 16)).eval()  # no dropout, no noise

    def loss(arrival, moving=1.0):
        trainer = TraceTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"),
                               extra_loops=0, loop_seed=0, arrival_weight=arrival, moving_weight=moving)
        with torch.no_grad():
            return trainer.compute_loss(model, dict(batch)).item()

    # by hand: n_loops is the deepest question's hops (extra_loops=0)
    depths, labels = batch["depths"], batch["labels"]
    n_loops = int(depths.max())
    with torch.no_grad():
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], n_loops=n_loops,
                          output_hidden_states=True, use_cache=False)
        logits = read_out(model, torch.cat(loop_states(model, out.hidden_states, n_loops)))
    targets = torch.cat([trace_targets(labels, depths, t) for t in range(1, n_loops + 1)])[:, 1:].flatten()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=-100,
                                           reduction="none")
    arriving = torch.cat([depths[:, :-1] == t for t in range(1, n_loops + 1)]).flatten()
    moving = torch.cat([depths[:, :-1] >= t for t in range(1, n_loops + 1)]).flatten()
    labelled = targets != -100
    assert arriving.sum() > 0 and (arriving & ~labelled).sum() == 0  # every arriving mark has a label
    assert (moving & ~arriving).sum() > 0 and (moving & ~labelled).sum() == 0  # waiting marks too
    count = labelled.sum().item()
    plain = ce[labelled].mean().item()
    on_arriving, on_moving = ce[arriving].sum().item() / count, ce[moving].sum().item() / count
    assert loss(1.0) == pytest.approx(plain, rel=1e-5)
    assert loss(4.0) == pytest.approx(plain + 3 * on_arriving, rel=1e-5) and on_arriving > 0
    assert loss(1.0, 4.0) == pytest.approx(plain + 3 * on_moving, rel=1e-5) and on_moving > on_arriving
    # on the arriving mark the two weights multiply: 2 x 3 = 6 there, 3 on the waiting marks
    expected = plain + 2 * (ce[moving & ~arriving].sum().item() / count) + 5 * on_arriving
    assert loss(2.0, 3.0) == pytest.approx(expected, rel=1e-5)
