"""Tensor and expert parallelism through transformers' ``DistributedConfig``, on 2 CPU processes (gloo).

``from_pretrained(dir, distributed_config=DistributedConfig(...))`` shards a checkpoint with the config's
``base_model_tp_plan`` / ``base_model_ep_plan`` / ``base_model_fsdp_plan``. In every layout two ranks allow (TP,
TP x EP, FSDP x EP, and FSDP alone), for MLA and GQA, the sharded model must compute what one unsharded process
computes: logits, one training step's gradients, the router-bias update, and cached greedy generation (dynamic and
static cache). One torchrun of tests/models/mythos/parallel_worker.py checks them all; the single-process side runs
meanwhile.
"""

from pathlib import Path

import pytest
import torch
from transformers.distributed import DistributedConfig
from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

import parallel_worker
from conftest import run_on_two_processes
from openmythos import MythosForCausalLM, mythos_tiny

CASES = [(attn_type, layout) for attn_type in parallel_worker.ATTN_TYPES for layout in parallel_worker.LAYOUTS]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """The workers' results for every (attention, layout), and the single-process results from the same files."""
    root = tmp_path_factory.mktemp("parallel")
    parallel_worker.save_checkpoints(root)
    out = root / "result.pt"

    def references():
        reference = {name: parallel_worker.reference(root, name) for name in (*parallel_worker.ATTN_TYPES, "uneven")}
        with torch.no_grad():
            reference["last"] = MythosForCausalLM.from_pretrained(root / "last")(
                input_ids=parallel_worker.inputs(), n_loops=parallel_worker.N_LOOPS).logits
        initial_bias = {attn_type: MythosForCausalLM.from_pretrained(root / attn_type).model.recurrent.layer.mlp.gate
                        .e_score_correction_bias for attn_type in parallel_worker.ATTN_TYPES}
        return reference, initial_bias

    sharded, (reference, initial_bias) = run_on_two_processes(Path(parallel_worker.__file__), root, out, out=out,
                                                              while_running=references)
    return dict(sharded=sharded, reference=reference, initial_bias=initial_bias)


@pytest.mark.parametrize("attn_type,layout", CASES)
def test_sharded_logits_equal_one_process(two_rank_run, attn_type, layout):
    logits = two_rank_run["sharded"][(attn_type, layout)]["logits"]
    # measured: at most 3.0e-7 (fp32 sums in another order)
    torch.testing.assert_close(logits, two_rank_run["reference"][attn_type]["logits"], rtol=0, atol=1e-5)


EXIT_CASES = [case for case in CASES if case[1] != "fsdp_ep"]


@pytest.mark.parametrize("attn_type,layout", EXIT_CASES)
def test_sharded_adaptive_depth_equals_one_process(two_rank_run, attn_type, layout):
    """Positions that stop early (an exit criterion): the same loops, logits and cached greedy tokens."""
    sharded, reference = two_rank_run["sharded"][(attn_type, layout)], two_rank_run["reference"][attn_type]
    loops_used = reference["loops_used"]
    assert loops_used.min() < parallel_worker.N_LOOPS == loops_used.max()  # some positions stopped early, not all
    assert torch.equal(sharded["loops_used"], loops_used)
    torch.testing.assert_close(sharded["adaptive_logits"], reference["adaptive_logits"], rtol=0, atol=1e-5)
    assert torch.equal(sharded["adaptive_tokens"], reference["adaptive_tokens"])


@pytest.mark.parametrize("attn_type", parallel_worker.ATTN_TYPES)
def test_early_exit_is_refused_when_experts_exchange_tokens_between_different_batches(two_rank_run, attn_type):
    # Each rank would run the experts' all-to-all a different number of times, and the ranks would wait forever.
    message = two_rank_run["sharded"][(attn_type, "fsdp_ep")]["adaptive_error"]
    assert message.startswith("exit_criterion lets positions stop early") and "ep_size=2 > tp_size=1" in message


def test_last_loop_sharing_under_fsdp_and_expert_parallelism_equals_one_process_and_refuses_unequal_lengths(
        two_rank_run):
    """loop_kv_sharing="last" runs positions one at a time, one expert all-to-all each: ranks holding batches of
    different lengths would wait for each other forever, so every rank refuses them with the same error."""
    sharded = two_rank_run["sharded"][("last", "fsdp_ep")]
    torch.testing.assert_close(sharded["logits"], two_rank_run["reference"]["last"], rtol=0, atol=1e-5)
    first, second = sharded["errors"]
    assert first == second
    assert first.startswith("loop_kv_sharing='last' runs a call's positions through the loop one at a time")
    assert "ep_size=2 > tp_size=1" in first and "got 8 to 10 positions" in first


@pytest.mark.parametrize("attn_type,layout", CASES)
def test_sharded_training_step_gives_the_gradients_of_one_process(two_rank_run, attn_type, layout):
    sharded, reference = two_rank_run["sharded"][(attn_type, layout)], two_rank_run["reference"][attn_type]
    torch.testing.assert_close(sharded["loss"], reference["loss"], rtol=1e-6, atol=0)
    assert sorted(sharded["grads"]) == sorted(reference["grads"])  # every parameter, gathered whole
    for name, grad in reference["grads"].items():
        assert grad.abs().max() > 0, name  # every parameter takes part, so a missing gradient sum would show
        # measured: at most 2e-7 absolute, 1.4e-6 of the tensor's largest entry
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("attn_type,layout", CASES)
def test_router_bias_update_under_sharding_equals_one_process(two_rank_run, attn_type, layout):
    bias = two_rank_run["sharded"][(attn_type, layout)]["bias"]
    expected = two_rank_run["reference"][attn_type]["bias"]
    assert not torch.equal(expected, two_rank_run["initial_bias"][attn_type])  # the update moved it
    torch.testing.assert_close(bias, expected, rtol=0, atol=0)


@pytest.mark.parametrize("attn_type,layout", CASES)
def test_sharded_cached_generation_gives_the_tokens_of_one_process(two_rank_run, attn_type, layout):
    sharded, reference = two_rank_run["sharded"][(attn_type, layout)], two_rank_run["reference"][attn_type]
    assert reference["tokens"].shape[1] == parallel_worker.SEQ_LEN + parallel_worker.NEW_TOKENS
    assert torch.equal(sharded["tokens"], reference["tokens"])
    assert torch.equal(sharded["static_tokens"], reference["tokens"])


@pytest.mark.parametrize("attn_type", parallel_worker.ATTN_TYPES)
def test_tensor_parallelism_shards_the_looped_block_once_and_replicates_the_loop_parameters(two_rank_run, attn_type):
    sharded = two_rank_run["sharded"][(attn_type, "tp")]
    assert sharded["tied"]  # lm_head is still the embedding, both split by vocabulary
    placements = sharded["sharded"]
    block = "model.recurrent.layer"
    query = "q_b_proj" if attn_type == "mla" else "q_proj"
    assert placements[f"{block}.self_attn.{query}.weight"] == "(Shard(dim=0),)"  # by head
    assert placements[f"{block}.self_attn.o_proj.weight"] == "(Shard(dim=1),)"
    assert placements[f"{block}.mlp.experts.gate_up_proj"] == "(_StridedShard(dim=1, sf=2),)"  # gate and up halves
    assert placements[f"{block}.mlp.experts.down_proj"] == "(Shard(dim=2),)"
    assert placements["model.embed_tokens.weight"] == "(Shard(dim=0),)"
    # the loop's own parameters and the router act on the whole hidden state: replicated
    for name in ("model.recurrent.injection.log_A", "model.recurrent.injection.B", "model.recurrent.lora.up",
                 "model.recurrent.lora.scale", f"{block}.mlp.gate.weight", f"{block}.input_layernorm.weight"):
        assert name not in placements, name


@pytest.mark.parametrize("attn_type", parallel_worker.ATTN_TYPES)
def test_expert_parallelism_gives_each_rank_whole_experts(two_rank_run, attn_type):
    placements = two_rank_run["sharded"][(attn_type, "tp_ep")]["sharded"]
    for name in ("gate_up_proj", "down_proj"):
        assert placements[f"model.recurrent.layer.mlp.experts.{name}"] == "(Shard(dim=0),)"  # n_experts / 2 each


def test_tensor_parallelism_splits_an_odd_expert_width_unevenly_and_exactly(two_rank_run):
    sharded, reference = two_rank_run["sharded"][("uneven", "tp")], two_rank_run["reference"]["uneven"]
    torch.testing.assert_close(sharded["logits"], reference["logits"], rtol=0, atol=1e-5)
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(sharded["tokens"], reference["tokens"])


@pytest.mark.parametrize("name", sorted(parallel_worker.REFUSED))
def test_layout_that_cannot_split_the_model_is_refused_naming_the_field(two_rank_run, name):
    message = two_rank_run["sharded"][name]
    assert message is not None, f"{name} loaded"
    assert parallel_worker.REFUSED[name][2] in message


def test_pipeline_parallelism_is_refused_before_loading():
    with pytest.raises(ValueError, match="pp_size=2: OpenMythos has no pipeline-parallel plan"):
        mythos_tiny().check_parallel_layout(DistributedConfig(pp_size=2))


def test_layouts_that_split_the_model_evenly_pass_the_check():
    config = mythos_tiny(attn_type="gqa", n_heads=8, n_kv_heads=4, n_experts=8)
    layouts = [dict(tp_size=4), dict(tp_size=2, ep_size=2), dict(fsdp_size=8, ep_size=8),
               dict(tp_size=4, fsdp_size=2, ep_size=8)]
    for sizes in layouts:
        config.check_parallel_layout(DistributedConfig(**sizes))  # raises nothing
    with pytest.raises(ValueError, match=r"`n_kv_heads` \(4\) must be divisible by tp_size \(8\)"):
        mythos_tiny(attn_type="gqa", n_heads=8, n_kv_heads=4, expert_dim=32).check_parallel_layout(
            DistributedConfig(tp_size=8))


@pytest.mark.parametrize("overrides", [
    dict(attn_type="mla"), dict(attn_type="mla", q_lora_rank=0), dict(attn_type="gqa"),
    dict(prelude_layers=0, n_shared_experts=0), dict(coda_layers=0, use_act=True),
], ids=["mla", "mla_no_q_lora", "gqa", "no_prelude_no_shared", "no_coda_act"])
def test_every_plan_rule_names_a_module_and_every_projection_has_a_rule(overrides):
    model = MythosForCausalLM(mythos_tiny(**overrides))
    names = {replace_layer_number_by_wildcard(name) for name, _ in model.model.named_modules()}
    names |= {replace_layer_number_by_wildcard(name) for name, _ in model.model.named_parameters()}
    config = model.config
    for plan in (config.base_model_tp_plan, config.base_model_ep_plan, config.base_model_fsdp_plan):
        assert set(plan) <= names, set(plan) - names  # transformers warns on every load about a rule naming nothing
    # The head-splitting and width-splitting projections all have a rule; what has none is replicated on purpose.
    split = {"q_proj", "k_proj", "v_proj", "q_b_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    linears = {replace_layer_number_by_wildcard(name) for name, module in model.model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in split}
    assert linears <= set(config.base_model_tp_plan), linears - set(config.base_model_tp_plan)
