"""``mythos demo --task text``: its corpus and split, its flags, and the whole pipeline end to end at toy size."""

import json
import subprocess
import sys

import pytest

from openmythos.demo import parse_args
from openmythos.demo.text import (DENSE, FIXED, SAMPLED, collect_documents, extrapolation_line, format_table,
                                  split_documents, split_of, summary)

TOY = ["--task", "text", "--dim", "32", "--heads", "2", "--seq-len", "32", "--steps", "8", "--batch-size", "4",
       "--mean-loops", "2", "--eval-loops", "1,2,4,8", "--exit-thresholds", "0.05,0.001", "--train-bytes", "20000",
       "--val-blocks", "4", "--test-blocks", "12"]


@pytest.fixture(scope="module")
def documents():
    return collect_documents()


def test_corpus_is_pydoc_topics_and_stdlib_docstrings_without_repeated_text(documents):
    names = [doc.name for doc in documents]
    assert len({doc.text for doc in documents}) == len(documents)
    assert any(name == "topic:assert" for name in names) and "json.dumps" in names
    assert sum(len(doc.text.encode("utf-8")) for doc in documents) > 1_000_000
    assert all(doc.text and doc.text == doc.text.strip() for doc in documents)
    # collected in a fixed order: a second walk gives the same documents
    assert [(d.name, d.text) for d in collect_documents()] == [(d.name, d.text) for d in documents]


def test_test_split_is_disjoint_from_training_and_about_a_tenth(documents):
    splits = split_documents(documents)
    train_texts = {doc.text for doc in splits["train"]}
    assert not train_texts & {doc.text for doc in splits["test"]}
    assert not train_texts & {doc.text for doc in splits["validation"]}
    assert not {d.name for d in splits["test"]} & {d.name for d in splits["validation"]}
    assert sum(map(len, splits.values())) == len(documents)
    assert 0.07 < len(splits["test"]) / len(documents) < 0.13
    # a document's split depends on its name alone
    assert all(split_of(doc.name) == name for name, docs in splits.items() for doc in docs)


@pytest.mark.parametrize("flags, match", [
    (["--eval-loops", "0,4"], "--eval-loops"),
    (["--exit-thresholds", "0.1,-1"], "--exit-thresholds"),
    (["--mean-loops", "0"], "--mean-loops"),
    (["--exit-criterion", "act"], "--exit-criterion"),
    (["--dim", "30", "--heads", "4"], "--dim"),
    (["--exit-tolerance", "1.5"], "--exit-tolerance"),
    # once a hang (hours of loops) or a table of NaN
    (["--eval-loops", "1,2,100000"], "--eval-loops"), (["--mean-loops", "100000"], "--mean-loops"),
    (["--lr", "inf"], "--lr"), (["--seed", "-1"], "--seed"),
])
def test_bad_text_flags_are_refused_naming_the_flag(flags, match, capsys):
    with pytest.raises(SystemExit) as refused:
        parse_args(["--task", "text", *flags])
    assert refused.value.code == 2 and match in capsys.readouterr().err


def test_a_bad_text_flag_on_the_command_line_prints_one_line_not_a_traceback():
    result = subprocess.run([sys.executable, "-m", "openmythos.cli", "demo", "--task", "text", "--steps", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--steps must be >= 1" in result.stderr and "Traceback" not in result.stderr


def test_text_flags_parse_lists_and_leave_the_other_tasks_alone():
    args = parse_args(["--task=text", "--eval-loops", "8,1,2", "--exit-thresholds", "0.001,0.01"])
    assert args.task == "text" and args.eval_loops == [1, 2, 8] and args.exit_thresholds == [0.01, 0.001]
    assert parse_args(["--task", "context"]).task == "context" and not hasattr(parse_args([]), "eval_loops")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "demo"
    # the fixed-loop model trains and is scored in a second process
    result = subprocess.run([sys.executable, "-m", "openmythos.demo", *TOY, "--jobs", "2", "--output-dir", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result, json.loads((out / "results.json").read_text())


def test_training_in_one_process_gives_the_same_models_as_in_two(toy_run, tmp_path):
    _, first_run, first = toy_run
    assert first_run.stdout.count("(in a second process)") == 1 and first["settings"]["jobs"] == 2
    result = subprocess.run([sys.executable, "-m", "openmythos.demo", *TOY, "--jobs", "1", "--output-dir",
                             str(tmp_path / "demo")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert "(in a second process)" not in result.stdout and again["settings"]["jobs"] == 1
    assert again["bpb"] == first["bpb"]
    for name, record in first["training"].items():
        assert again["training"][name]["last_loss"] == record["last_loss"], name


def test_text_demo_runs_end_to_end_and_scores_every_loop_count(toy_run):
    out, result, results = toy_run
    bpb = results["bpb"]
    assert set(bpb) == {SAMPLED, FIXED, DENSE} and results["eval_loops"] == [1, 2, 4, 8]
    for name in (SAMPLED, FIXED):
        row = bpb[name]
        assert set(row["n_loops"]) == {"1", "2", "4", "8"}
        assert all(0 < value < 8 for value in row["n_loops"].values())
        # more loops change the prediction: the looped models really run n_loops
        assert len({round(value, 6) for value in row["n_loops"].values()}) > 1
        exit_rule = row["exit"]
        assert exit_rule["criterion"] == "kl" and exit_rule["budget"] == 8 and exit_rule["threshold"] in (0.05, 0.001)
        assert 1 <= exit_rule["mean_loops"] <= 8 and 0 < exit_rule["bpb"] < 8
        choice = exit_rule["choice"]
        assert set(choice["validation_fixed_bpb"]) == {"1", "2", "4", "8"}
        assert choice["validation_best_bpb"] == min(choice["validation_fixed_bpb"].values())
    # the dense model has one depth: the same value in every column, and no exit rule
    assert len(set(bpb[DENSE]["n_loops"].values())) == 1 and "exit" not in bpb[DENSE]
    params = results["parameters"]
    assert params[SAMPLED] == params[FIXED] and abs(params[DENSE] - params[SAMPLED]) / params[SAMPLED] < 0.2
    corpus = results["corpus"]
    assert corpus["blocks"]["test"] == 12 and corpus["blocks"]["validation"] == 4
    assert corpus["bytes"]["train"] >= 20000 and corpus["bytes"]["test"] > 0
    assert results["load_average"]["start"] is None or len(results["load_average"]["start"]) == 3
    args = parse_args(TOY)
    assert (out / "bpb.md").read_text().strip() == format_table(bpb, args)
    assert results["summary"] == summary(bpb, args)
    png = (out / "bpb.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "Test bits per byte" in result.stdout and "{'loss'" not in result.stdout


def test_summary_checks_every_deeper_loop_count_against_the_training_mean():
    args = parse_args(["--task", "text", "--mean-loops", "4"])
    row = {"1": 3.0, "2": 2.5, "4": 2.0, "8": 2.01, "16": 2.019, "32": 2.0}
    bpb = {SAMPLED: {"n_loops": row}}
    assert summary(bpb, args)["goal_met"] is True
    bpb[SAMPLED]["n_loops"] = {**row, "16": 2.03}
    s = summary(bpb, args)
    assert s["goal_met"] is False and s["relative_change_vs_reference"]["16"] == pytest.approx(0.015)
    assert extrapolation_line(s) == ("Loop-sampled model against its 4 loops: 8 loops +0.50%, 16 loops +1.50%, "
                                     "32 loops +0.00% (NOT all within +1%).")


def test_without_deeper_loop_counts_the_verdict_says_no_check_was_made():
    """It once printed '(NOT all within +1%)' after an empty list."""
    args = parse_args(["--task", "text", "--mean-loops", "4", "--eval-loops", "1,2,4"])
    s = summary({SAMPLED: {"n_loops": {"1": 3.0, "2": 2.5, "4": 2.0}}}, args)
    assert s["goal_met"] is False and s["relative_change_vs_reference"] == {}
    assert extrapolation_line(s) == ("No --eval-loops past --mean-loops 4: the extrapolation check (bits per byte at "
                                     "more loops within +1%) was not made.")
    args = parse_args(["--task", "text", "--mean-loops", "3", "--eval-loops", "1,2,4"])
    assert extrapolation_line(summary({SAMPLED: {"n_loops": {"1": 3.0, "2": 2.5, "4": 2.0}}}, args)) is None


def test_mythos_demo_help_names_the_text_task_and_its_own_help_lists_its_flags(capsys):
    """In process: the console script is ``openmythos.cli:main`` (another test runs it as a process)."""
    from openmythos.cli import main
    for argv, expected in ((["demo", "--help"], "text"), (["demo", "--task", "text", "--help"], "--eval-loops")):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0 and expected in capsys.readouterr().out


@pytest.mark.parametrize("exit_bpb, chosen, passed", [
    ({0.03: 2.10, 0.01: 2.009, 0.003: 2.0}, 0.01, True),  # 0.03 costs 5%, 0.01 is within 0.5% of the best fixed depth
    ({0.03: 2.00, 0.01: 2.0, 0.003: 2.0}, 0.03, True),  # the largest (cheapest) passing threshold wins
    ({0.03: 2.20, 0.01: 2.15, 0.003: 2.30}, 0.01, False),  # none passes: the lowest validation bits per byte
])
def test_exit_threshold_is_the_largest_within_tolerance_of_the_best_fixed_depth(monkeypatch, exit_bpb, chosen,
                                                                                 passed):
    from openmythos.demo import text_pipeline

    fixed = {1: 2.5, 2: 2.1, 4: 2.0, 8: 2.02}

    def fake_bits_per_byte(model, rows, eos_token_id, n_loops, exit_criterion=None, exit_threshold=None):
        if exit_criterion is None:
            return {"bpb": fixed[n_loops], "mean_loops": float(n_loops)}
        assert exit_criterion == "kl" and n_loops == 8  # the budget is the deepest scored loop count
        return {"bpb": exit_bpb[exit_threshold], "mean_loops": 3.0}

    monkeypatch.setattr(text_pipeline, "bits_per_byte", fake_bits_per_byte)
    args = parse_args(["--task", "text", "--eval-loops", "1,2,4,8", "--exit-thresholds", "0.03,0.01,0.003"])
    choice = text_pipeline.pick_threshold(None, None, args, eos_token_id=2)
    assert choice["threshold"] == chosen and choice["passed"] is passed
    assert choice["validation_best_bpb"] == 2.0 and set(choice["validation_fixed_bpb"]) == {"1", "2", "4", "8"}
