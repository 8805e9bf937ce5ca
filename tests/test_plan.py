"""`mythos plan`: the memory model matches measured peaks, the KV-cache and traffic formulas hold, bad input is
refused."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openmythos import MythosForCausalLM, mythos_1b, mythos_100b, mythos_tiny
from openmythos.plan import (LAYOUTS, Precision, kv_cache_bytes, parameter_groups, parse_memory, plan,
                             preset_layout_table)
from openmythos.parameters import count_parameters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.parametrize("index", [0, 1])
def test_memory_estimate_is_within_ten_percent_of_the_measured_training_step_peak(index):
    """One process (FSDP degree 1), fp32 AdamW, after a first step: parameters + gradients + AdamW state +
    activations as planned, against the peak the profiler measures. Config 0 (MLA) is mostly activations, config 1
    (GQA) mostly parameters, gradients and optimizer state."""
    import plan_memory

    torch.set_num_threads(1)
    name, overrides, batch, seq_len, n_loops, checkpointing = plan_memory.CONFIGS[index]
    result = plan_memory.measure(overrides, batch, seq_len, n_loops, checkpointing)
    assert 0.9 <= result["ratio"] <= 1.1, (name, result)
    # the parts are real: neither the activations nor the static state is negligible in these configs
    static = result["params"] + result["grads"] + result["adamw"]
    assert result["activations"] > 0.05 * static and static > 0.05 * result["activations"], result


def test_parameter_groups_add_up_to_the_model_count():
    for config in (mythos_tiny(), mythos_tiny(attn_type="gqa"), mythos_1b()):
        groups = parameter_groups(config)
        assert groups.total == count_parameters(config).total
        assert groups.experts == 3 * config.n_experts * config.expert_dim * config.dim
        assert len(groups.dense_layers) == config.prelude_layers + config.coda_layers
        assert 0 < groups.muon < groups.total


@pytest.mark.parametrize("attn_type, sharing", [("mla", "none"), ("gqa", "none"), ("mla", "first"), ("gqa", "first")])
def test_kv_cache_formula_equals_the_cache_a_forward_fills(attn_type, sharing):
    config = mythos_tiny(attn_type=attn_type, loop_kv_sharing=sharing)
    model = MythosForCausalLM(config).eval()
    ids = torch.randint(4, config.vocab_size, (2, 20))
    with torch.no_grad():
        cache = model(ids, n_loops=3, use_cache=True).past_key_values
    filled = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
                 if t is not None)
    assert filled == kv_cache_bytes(config, 20, batch=2, n_loops=3, cache_bytes=4)


def test_loop_traffic_grows_with_n_loops_only_when_gathered_per_iteration():
    config = mythos_100b()
    groups = parameter_groups(config)
    by_loops = {n: plan(config, 64, groups=groups, n_loops=n, layouts=("fsdp",)).layouts[0].traffic
                for n in (1, 8, 32)}
    assert by_loops[1]["once"] == by_loops[1]["per-iteration"]
    assert by_loops[8]["once"]["all_gather"] == by_loops[32]["once"]["all_gather"] == by_loops[1]["once"]["all_gather"]
    # per iteration, the looped unit (97% of the weights) is gathered n_loops times in forward and in backward
    growth = by_loops[32]["per-iteration"]["all_gather"] / by_loops[1]["per-iteration"]["all_gather"]
    assert 30 < growth < 32
    assert by_loops[32]["per-iteration"]["reduce_scatter"] > 30 * by_loops[32]["once"]["reduce_scatter"]


def test_expert_and_tensor_parallel_layouts_shrink_what_fsdp_gathers():
    config = mythos_100b()
    result = plan(config, 64, parse_memory("80GB"))
    fsdp, ep, ep_tp = result.layouts
    assert [lp.layout.name for lp in result.layouts] == list(LAYOUTS)
    # every layout stores each parameter once over the 64 GPUs
    assert fsdp.params == pytest.approx(ep.params, rel=1e-6) == pytest.approx(parameter_groups(config).total * 2 / 64)
    assert fsdp.gathered > 5 * ep.gathered > 5 * ep_tp.gathered
    assert fsdp.traffic["once"]["all_to_all"] == 0 < ep.traffic["once"]["all_to_all"]
    assert ep.traffic["once"]["all_reduce"] == 0 < ep_tp.traffic["once"]["all_reduce"]
    assert (fsdp.fits(), ep_tp.fits()) == (False, True)
    # checkpointing keeps less than the plain step
    assert ep_tp.activations.peak(True) < ep_tp.activations.peak(False) / 4


def test_precision_bytes_add_to_sixteen_per_parameter_by_default():
    config = mythos_1b()
    single = plan(config, 1, layouts=("fsdp",)).layouts[0]
    total = parameter_groups(config).total
    assert single.params + single.grads + single.optimizer["adamw"] == pytest.approx(16 * total, rel=1e-6)
    # Muon keeps one fp32 state (momentum) for its matrices instead of AdamW's two
    assert single.optimizer["adamw"] - single.optimizer["muon"] == pytest.approx(4 * parameter_groups(config).muon,
                                                                                abs=8)
    fp32 = plan(config, 1, precision=Precision("fp32", "fp32", "none"), layouts=("fsdp",)).layouts[0]
    assert fp32.params + fp32.grads + fp32.optimizer["adamw"] == pytest.approx(16 * total, rel=1e-6)
    assert fp32.optimizer["adamw"] == 8 * total


@pytest.mark.parametrize("kwargs, named", [
    (dict(gpus=0), "gpus"), (dict(gpus=8, batch=0), "batch"), (dict(gpus=8, optimizer="sgd"), "optimizer"),
    (dict(gpus=8, tp=3, layouts=("fsdp+ep+tp",)), "tp"), (dict(gpus=8, ep=3, layouts=("fsdp+ep",)), "ep"),
    (dict(gpus=8, layouts=("zero3",)), "layout"), (dict(gpus=8, adamw_impl="apex"), "adamw_impl"),
])
def test_plan_refuses_bad_arguments_naming_them(kwargs, named):
    with pytest.raises(ValueError, match=f"`{named}`"):
        plan(mythos_tiny(), **kwargs)


def test_precision_and_memory_refuse_unknown_values():
    with pytest.raises(ValueError, match="`grad`"):
        Precision(grad="fp8")
    with pytest.raises(ValueError, match="gpu_memory"):
        parse_memory("lots")
    assert parse_memory("80GB") == 80 * 10**9 and parse_memory("96GiB") == 96 * 2**30


# what the `mythos` console script does (the package then defers torch until a command needs it)
CONSOLE_SCRIPT = """
import sys
sys.argv = ["mythos", *{argv!r}]
from openmythos.cli import main
code = main()
print("heavy modules:", sorted(m for m in ("torch", "transformers") if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def _mythos(*argv):
    return subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT.format(argv=list(argv))], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_plan_command_prints_memory_traffic_and_fit_for_the_three_layouts():
    result = _mythos("plan", "--preset", "mythos_100b", "--gpus", "64", "--gpu-memory", "80GB")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for header in ("Memory per GPU", "Traffic per GPU per step", "Fits in 80.0 GB"):
        assert header in out
    for row in ("| fsdp | 64 (1 x 1) |", "| fsdp+ep | 64 (1 x 64) |", "| fsdp+ep+tp | 64 (8 x 64) |"):
        assert row in out
    assert "fsdp: no" in out and "fsdp+ep+tp: yes" in out


@pytest.mark.parametrize("argv, message, torch_loaded", [
    (["--gpus", "64", "--gpu-memory", "80XB"], "--gpu-memory must be a positive size", False),
    (["--gpus", "0"], "--gpus must be a positive integer", False),
    (["--gpus", "64", "--tp", "3"], "--tp must divide", True),
    (["--gpus", "64", "--ep", "3"], "--ep must divide", True),
    # once silently ignored
    (["--gpus", "8", "--layout", "fsdp", "--tp", "2"], "--layout fsdp has no TP", False),
    (["--gpus", "8", "--layout", "fsdp", "--ep", "2"], "--layout fsdp has no EP", False),
    (["--gpus", "8", "--layout", "fsdp+ep", "--tp", "2"], "--layout fsdp+ep has no TP", False),
    (["--gpus", "8", "--n-loops", "100000"], "--n-loops must be at most", True),
])
def test_plan_command_refuses_bad_flags_in_one_line(argv, message, torch_loaded):
    result = _mythos("plan", "--preset", "mythos_100b", *argv)
    assert result.returncode == 2 and result.stdout == ""
    error, loaded = result.stderr.splitlines()
    assert error.startswith("mythos plan: error: ") and message in error, result.stderr
    assert ("'torch'" in loaded) == torch_loaded  # flags checked before the model stack is imported


def test_readme_layout_table_is_what_the_plan_prints_now():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- plan-table:start -->\n")[1].split("\n<!-- plan-table:end -->")[0]
    assert table == preset_layout_table()
