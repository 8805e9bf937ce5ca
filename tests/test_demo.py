"""The reasoning demo: its task generator, and the whole pipeline end to end at toy size."""

import json
import subprocess
import sys

import pytest

from openmythos import MythosTokenizer
from openmythos.tasks import HOP_MARK, PointerChasingTask


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
        assert task.question(start, 5) == HOP_MARK * 5 + start


def test_task_is_deterministic_for_a_seed_and_differs_across_seeds():
    assert PointerChasingTask(seed=1).successor == PointerChasingTask(seed=1).successor
    assert PointerChasingTask(seed=1).successor != PointerChasingTask(seed=2).successor
    one = PointerChasingTask(seed=1).examples(range(1, 5), 50, seed=7)
    assert one == PointerChasingTask(seed=1).examples(range(1, 5), 50, seed=7)
    assert {row["hops"] for row in one} == {1, 2, 3, 4}


def test_dataset_rows_learn_only_the_answer_and_eos():
    tokenizer = MythosTokenizer()
    task = PointerChasingTask(num_nodes=8, seed=0)
    data = task.dataset(tokenizer, [2, 3], num_examples=20, seed=0)
    assert len(data) == 20 and set(data.column_names) >= {"input_ids", "labels", "hops", "question", "answer"}
    for row in data:
        question = tokenizer.encode(row["question"], add_special_tokens=False)
        answer = tokenizer.encode(row["answer"], add_special_tokens=False)
        assert row["input_ids"] == question + answer + [tokenizer.eos_token_id]
        assert row["labels"] == [-100] * len(question) + answer + [tokenizer.eos_token_id]
        assert row["answer"] == task.follow(row["question"][-1], row["hops"])
        assert tokenizer.decode(row["input_ids"], skip_special_tokens=True) == row["question"] + row["answer"]


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


def test_demo_rejects_eval_depths_that_wrap_around_the_cycle():
    result = subprocess.run([sys.executable, "-m", "openmythos.demo", "--num-nodes", "6", "--eval-hops", "6"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--eval-hops" in result.stderr


def test_demo_runs_end_to_end_at_toy_size(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "openmythos.demo", "--train-hops", "2", "--num-nodes", "8", "--dim", "32",
         "--heads", "2", "--steps", "12", "--baseline-steps", "6", "--batch-size", "16", "--train-examples", "200",
         "--samples", "2", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["hops"] == [1, 2, 3, 4]
    table = results["accuracy"]
    expected_columns = {f"looped@{n}" for n in range(1, 7)} | {"looped@hops", "dense_same_params",
                                                                "dense_same_compute"}
    assert set(table) == expected_columns
    for column in table.values():
        assert len(column) == 4 and all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in column)
    # the looped column at n_loops=hops is the diagonal of the per-n_loops columns
    assert table["looped@hops"] == [table[f"looped@{k}"][k - 1] for k in range(1, 5)]
    assert set(results["summary"]) >= {"looped_in_distribution", "dense_same_params_at_eval_hops"}
    # every model's answer set is scored over all 8 start nodes, so accuracies are multiples of 1/8
    assert all(abs(a * 8 - round(a * 8)) < 1e-6 for column in table.values() for a in column)
    markdown = (out / "accuracy.md").read_text()
    assert markdown.count("\n") == 2 + 4 and "(held out)" in markdown
    png = (out / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "looped-model" / "model.safetensors").exists()
    assert len(results["samples"]) == 2 and all(s["n_loops"] == s["hops"] for s in results["samples"])
    assert "Sample questions, answered by the reloaded model" in result.stdout
    params = results["parameters"]
    assert abs(params["dense_same_params"] - params["looped"]) / params["looped"] < 0.35
