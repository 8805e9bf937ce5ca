"""The benchmarks run and write complete results. They never assert timings (CI machines are noisy).

The side-by-side benchmark needs the reference implementation (`pip install --no-deps open-mythos==0.5.0`), which is
not a dependency of this package, so that test is skipped where it is not installed (CI included). The adaptive-depth
benchmark needs nothing beyond the package.
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_reference.py"
ADAPTIVE = ROOT / "benchmarks" / "adaptive_depth.py"
SERVING = ROOT / "benchmarks" / "serving.py"

needs_reference = pytest.mark.skipif(
    importlib.util.find_spec("open_mythos") is None,
    reason="the reference implementation is not installed (pip install --no-deps open-mythos==0.5.0)",
)

WORKLOADS = ("forward", "generate", "train_step")


@needs_reference
def test_quick_benchmark_writes_every_measure_for_both_attention_types(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--reps", "1", "--warmup", "0", "--new-tokens", "2",
         "--threads", "1", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ref / ours" in result.stdout or "ref/ours" in result.stdout

    data = json.loads(out.read_text())
    assert data["meta"]["threads"] == 1 and data["meta"]["n_loops"] == 4 and data["meta"]["dtype"] == "float32"
    assert set(data["attn"]) == {"mla", "gqa"}
    for attn, res in data["attn"].items():
        # one config per model: each runs its own kernels (a shared config once made every model eager)
        assert res["implementations"]["ours"] == {"attn_implementation": "sdpa", "experts_implementation": "grouped_mm"}
        params = res["params"]
        # same architecture: the reference only adds its ACT head (dim + 1) and a recurrent-input norm (dim)
        assert params["ref"] - params["ours"] == 2 * 256 + 1, (attn, params)
        kv = res["kv_cache_bytes_per_token"]
        assert kv["ref"] > 0 and kv["ours"] > 0 and kv["ref_slots"] == kv["ours_slots"] == 6
        for workload in WORKLOADS:
            timing = res["timings"][workload]
            assert set(timing) == {"ref", "ours"}, (attn, workload, timing)
            for name, t in timing.items():
                assert t["median_ms"] > 0 and t["min_ms"] > 0 and t["reps"] >= 1, (attn, workload, name, t)
    # MLA caches the latent plus one shared rope key per token and slot: (32 + 16) fp32 numbers x 6 slots
    assert data["attn"]["mla"]["kv_cache_bytes_per_token"]["ours"] == (32 + 16) * 4 * 6
    # GQA caches 2 kv heads x 32 dims for keys and values in both implementations
    assert data["attn"]["gqa"]["kv_cache_bytes_per_token"]["ours"] == 2 * 2 * 32 * 4 * 6


def test_benchmark_explains_how_to_install_a_missing_reference(tmp_path):
    """Run with `open_mythos` made unimportable: the script says how to install it instead of a traceback."""
    blocker = tmp_path / "open_mythos.py"
    blocker.write_text("raise ImportError('hidden for this test')\n")
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2
    assert "pip install --no-deps open-mythos==0.5.0" in result.stderr


def test_quick_adaptive_depth_benchmark_trains_measures_every_criterion_and_judges_the_goal(tmp_path):
    out = tmp_path / "adaptive.json"
    command = [sys.executable, str(ADAPTIVE), "--quick", "--threads", "1", "--model-dir", str(tmp_path / "model"),
               "--json", str(out)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| fixed (n_loops=8) |" in result.stdout and "Per-row budgets faster" in result.stdout

    data = json.loads(out.read_text())
    assert data["meta"]["budget"] == 8 and data["meta"]["start"]["torch_threads"] == 1
    assert data["model"]["trained_now"] and data["model"]["use_act"]
    assert (tmp_path / "model" / "training.json").exists() and (tmp_path / "model" / "config.json").exists()
    fixed = data["fixed"]
    assert fixed["mean_loops"] == 8 and fixed["generate_loops_per_token"] == 8 and fixed["perplexity"] > 1
    assert set(data["criteria"]) == {"act", "delta", "kl"} and data["skipped"] == {}
    for name, rows in data["criteria"].items():
        assert len(rows) == 1, (name, rows)
        for row in rows:
            assert 1 <= row["mean_loops"] <= 8 and row["perplexity"] > 1, (name, row)
            assert row["loop_saving"] == pytest.approx(1 - row["mean_loops"] / 8)
            assert 1 <= row["forward"]["mean_loops"] <= 8 and 1 <= row["generate"]["loops_per_token"] <= 8
            # a decode step runs the most loops of its tokens; with one row, exactly that token's
            assert row["generate"]["loops_per_token"] <= row["generate"]["loops_per_step"] <= 8
            assert row["generate_1"]["loops_per_step"] == pytest.approx(row["generate_1"]["loops_per_token"])
            for workload in ("forward", "generate", "generate_1"):
                timing = row[workload]
                assert timing["ratio"] > 0 and timing["fixed_ms"] > 0 and timing["adaptive_ms"] > 0, (name, timing)
            assert set(row["missed"]) <= {"loops", "ppl", "forward time", "8-row generate time", "1-row generate time"}
    for name, verdict in data["verdicts"].items():
        assert verdict["met"] == (verdict["threshold"] is not None) and verdict["line"].startswith(name)
    per_row = data["per_row"]
    # every row runs exactly its own budget, in the forward and for every generated token
    assert per_row["row_loops"] == per_row["generate_row_loops"] == per_row["n_loops"] == list(range(1, 9))
    assert per_row["mean_loops"] == 4.5
    assert per_row["forward"]["ratio"] > 0 and per_row["generate"]["ratio"] > 0


RUN = ROOT / "benchmarks" / "run.py"


def _run_benchmark(tmp_path, *flags, hide_reference=False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "run.json"
    env = dict(os.environ)
    if hide_reference:  # CI has no reference: the same run must work, with its column left out
        (tmp_path / "open_mythos.py").write_text("raise ImportError('hidden for this test')\n")
        env["PYTHONPATH"] = str(tmp_path)
    result = subprocess.run([sys.executable, str(RUN), "--quick", *flags, "--json", str(out)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads(out.read_text())


def test_one_command_benchmark_runs_every_section_for_both_attention_types(tmp_path):
    """Every section for MLA with the compiled columns, and for GQA without them (dynamo's tracing, even with its
    eager backend, is most of a quick run's time; tests/models/mythos/test_compile_mythos.py compiles both types)."""
    for attn, compiled in (("mla", True), ("gqa", False)):
        flags = ["--attn", attn] + ([] if compiled else ["--compile-backend", "none"])
        stdout, data = _run_benchmark(tmp_path / attn, *flags, hide_reference=True)
        assert "reference not installed" in stdout and "load average" in stdout
        machine = data["machine"]
        assert machine["threads"] == 1 and machine["dtype"] == "float32" and machine["reference"] is None
        assert machine["matmul_peak_gflops"] > 0 and machine["read_bandwidth_gbs"] > 0
        assert set(data["runs"]) == {f"small/{attn}"}
        run = data["runs"][f"small/{attn}"]
        models = run["models"]
        # one config per model: each prints and runs its own kernels; compiled generate was checked against eager
        kinds = {"ours", "peer"} | ({"ours+compile", "peer+compile"} if compiled else set())
        assert set(models["kernels"]) == kinds, attn
        assert models["kernels"]["ours"] == "attn=sdpa, experts=grouped_mm"
        assert set(models["timings"]) == {"forward", "generate_p16", "train_step"}
        for workload, timing in models["timings"].items():
            assert set(timing) == kinds and all(t["median_ms"] > 0 for t in timing.values()), (attn, workload)
            assert all(mb >= 0 for mb in models["peak_memory_mb"][workload].values())
        assert models["peak_memory_mb"]["train_step"]["ours"] > 0  # activations kept for backward
        for kind in kinds - {"ours", "peer"}:
            assert set(models["compile_s"][kind]) == {"forward", "generate_p16", "train_step"}
        # equal compute: the unrolled peer caches exactly what our default (one slot per loop) caches
        assert models["kv_bytes_per_token"]["peer"] == models["kv_bytes_per_token"]["ours"], attn
        assert set(run["context"]["decode_ms"]) == {"64", "128"}
        loops = run["loops"]["kv_bytes_per_token"]
        assert set(loops) == {"1", "2"}
        for sharing in ("ours[first]", "ours[last]"):  # flat in n_loops with sharing, growing without
            assert loops["1"][sharing] == loops["2"][sharing] == loops["1"]["ours"], (attn, sharing)
        assert loops["2"]["ours"] > loops["1"]["ours"] and loops["2"]["ours"] == loops["2"]["peer"]
        roofline = run["roofline"]
        # the shares use the higher of the peaks (bandwidths) measured at the start and beside the timings
        assert roofline["matmul_peak_gflops"] >= machine["matmul_peak_gflops"]
        assert roofline["decode"]["read_bandwidth_gbs"] >= machine["read_bandwidth_gbs"]
        for name, share in roofline["matmul_peak_fraction"].items():
            assert 0 < share["forward"] <= 1 and 0 < share["train_step"] <= 1, (attn, name, share)
        assert roofline["flops"]["ours"]["train_step"] > 2 * roofline["flops"]["ours"]["forward"] > 0
        decode = roofline["decode"]
        assert 0 < decode["distinct_weight_bytes"] < decode["weight_bytes"]  # the loop re-reads its block's weights
        assert set(decode["step_ms"]) == {"ours", "ours+compile"} & kinds
        assert all(0 < f for f in decode["floor_fraction"].values())
        if "ours+compile" in kinds:  # where the compiled step's time goes
            split = decode["compiled_step_split"]
            assert split["step_ms"] == decode["step_ms"]["ours+compile"]
            assert 0 < split["call_ms"] and split["call_ms"] + split["loop_ms"] == pytest.approx(split["step_ms"])
            assert 0 < split["guard_ms"] < split["call_ms"]
        # MLA caches the latent plus one shared rope key per token and slot: (32 + 16) fp32 numbers x 6 slots;
        # GQA 2 kv heads x 32 dims for keys and for values
        assert models["kv_bytes_per_token"]["ours"] == ((32 + 16) if attn == "mla" else 2 * 2 * 32) * 4 * 6


@needs_reference
def test_one_command_benchmark_times_the_reference_beside_ours(tmp_path):
    stdout, data = _run_benchmark(tmp_path, "--sections", "models", "--attn", "gqa")
    models = data["runs"]["small/gqa"]["models"]
    assert set(models["kernels"]) == {"ours", "ours+compile", "ref", "peer", "peer+compile"}
    assert data["machine"]["reference"] == "0.5.0"
    assert all(t["ref"]["median_ms"] > 0 for t in models["timings"].values())
    assert "ref/ours+compile" in stdout


def test_one_command_benchmark_refuses_bad_arguments_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(RUN), "--loop-counts", "0", "4"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--loop-counts must all be >= 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_quick_serving_benchmark_times_mixed_and_uniform_budgets_through_continuous_batching(tmp_path):
    out = tmp_path / "serving.json"
    result = subprocess.run([sys.executable, str(SERVING), "--quick", "--threads", "1", "--json", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixed / uniform" in result.stdout and "load average" in result.stdout

    data = json.loads(out.read_text())
    machine = data["machine"]
    assert machine["threads"] == 1 and machine["torch"] and machine["transformers"] and machine["cpu_count"] >= 1
    assert "load_average_at_start" in machine and "load_average_at_end" in machine
    assert data["budgets"] == list(range(1, 9))  # quick: 8 requests, budgets 1..8 (the full run: 32, 1..16 twice)
    assert len(data["prompt_lengths"]) == 8 and all(8 <= n <= 32 for n in data["prompt_lengths"])
    assert set(data["attn"]) == {"mla", "gqa"}
    for attn, res in data["attn"].items():
        assert set(res["timings"]) == {"mixed", "uniform"}
        for timing in res["timings"].values():
            assert timing["tokens"] == 8 * 2 and timing["tokens_per_s"] > 0 and timing["cpu_s_median"] > 0
        assert res["mixed_over_uniform"] > 0 and res["mixed_over_uniform_cpu"] > 0
        assert res["ideal"] == 16 / 4.5


@pytest.fixture
def run_module(monkeypatch):
    """benchmarks/run.py as a module under a name of its own; what importing it changes (dynamo's recompile limit,
    HF_HUB_OFFLINE, sys.path, the modules it imports) is undone after the test."""
    import torch._dynamo

    limit = torch._dynamo.config.recompile_limit
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))
    monkeypatch.syspath_prepend(str(RUN.parent))
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("openmythos_benchmarks_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    torch._dynamo.config.recompile_limit = limit
    if "bench_reference" not in before:
        sys.modules.pop("bench_reference", None)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_flop_count_sees_the_fused_kernels_that_torch_counts_as_zero(run_module, attn_type):
    """The roofline's FLOPs: with sdpa (CPU flash attention) and grouped_mm experts, forward and train step count
    exactly what the plain path (eager attention, a matmul per expert) counts. torch's FlopCounterMode alone gives
    those kernels 0 FLOPs, which made our share of the matmul peak look 30% lower than it was."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from openmythos import MythosConfig, MythosForCausalLM

    torch.manual_seed(0)
    mla = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    config = MythosConfig(vocab_size=300, dim=64, n_heads=4, n_kv_heads=2, max_loop_iters=4, prelude_layers=1,
                          coda_layers=1, n_experts=4, n_experts_per_tok=2, expert_dim=32, attn_type=attn_type,
                          **(mla if attn_type == "mla" else {}))  # sizes grouped_mm takes (multiples of 16)
    # one config object per model: loading writes the kernel choice onto it
    fast = MythosForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa").train()
    plain = MythosForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager").train()
    plain.set_experts_implementation("eager")
    assert (fast.config._attn_implementation, fast.config._experts_implementation) == ("sdpa", "grouped_mm")
    ids = torch.randint(4, config.vocab_size, (2, 24))

    def step(model):
        model(ids, labels=ids, n_loops=3).loss.backward()

    for workload in (lambda m: m(ids, n_loops=3), step):
        assert run_module.flops_of(lambda: workload(fast)) == run_module.flops_of(lambda: workload(plain)) > 0
    counter = FlopCounterMode(display=False)  # without the added formulas the fused kernels are missed
    with counter:
        step(fast)
    assert counter.get_total_flops() < run_module.flops_of(lambda: step(plain))


@pytest.mark.parametrize("argv, flag", [
    (["--path", "grouped", "--runs", "small/mla"], "--path grouped"),
    (["--runs", "tiny/gqa"], "--runs"),
    (["--path", "own-mask", "--new-tokens", "1"], "--new-tokens"),
    (["--runs", "small/gqa", "--kv-heads", "3"], "--kv-heads"),
    (["--path", "fused"], "--path"),
])
def test_paired_decode_refuses_bad_arguments_before_building_a_model(argv, flag):
    """benchmarks/paired_decode.py compiles two models per run (minutes): a bad argument stops it at once, with one
    line naming the flag."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paired_decode.py"), *argv],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and flag in result.stderr and "Traceback" not in result.stderr
