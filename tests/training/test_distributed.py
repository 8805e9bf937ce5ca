"""FSDP2: ``apply_fsdp2`` on 2 CPU processes (gloo) trains exactly like one unsharded process, and so does
Accelerate's FSDP2 wrapping under examples/accelerate_fsdp.yaml.

Accelerate turns FSDP off on CPU, so the README's ``accelerate launch`` line itself needs a GPU box. Here the config
goes through Accelerate's launcher code (config -> environment -> plugin) and its FSDP2 model preparation, in fp32.
"""

from pathlib import Path

import pytest
import torch
import yaml

import fsdp_worker
from conftest import run_on_two_processes
from openmythos import modeling_mythos
from openmythos.modeling_mythos import MythosPreTrainedModel
from openmythos.training.distributed import apply_fsdp2

ROOT = Path(__file__).resolve().parents[2]  # tests/<area>/this file
ACCELERATE_CONFIG = ROOT / "examples" / "accelerate_fsdp.yaml"


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """Rank 0's results from tests/training/fsdp_worker.py on 2 processes, plus single-process reference runs over the
    whole global batch, computed while the workers run."""
    out = tmp_path_factory.mktemp("fsdp") / "result.pt"

    def references():
        reference = fsdp_worker.build_model()
        act_reference = fsdp_worker.build_model(use_act=True)
        return dict(
            reference=reference, reference_losses=fsdp_worker.train(reference, fsdp_worker.global_batches()),
            act_reference=act_reference,
            act_reference_losses=fsdp_worker.train(act_reference, fsdp_worker.global_batches()[:2]),
            accelerate_reference_losses=fsdp_worker.train(fsdp_worker.build_model(**fsdp_worker.ACCELERATE_MODEL),
                                                          fsdp_worker.global_batches()[:2]))

    sharded, references = run_on_two_processes(Path(fsdp_worker.__file__), out, out=out, while_running=references,
                                               timeout=240)
    return dict(sharded=sharded, **references)


def assert_same_state(sharded_state, reference):
    state = reference.state_dict()
    assert sorted(sharded_state) == sorted(state)
    for name, value in state.items():
        # fp32 sums in another order (reduce-scatter over 2 ranks vs one process), through Adam's normalised steps:
        # measured up to 1.9e-6 on weights of size ~0.07 on an AVX-512 machine
        torch.testing.assert_close(sharded_state[name], value, rtol=1e-5, atol=5e-6, msg=name)


def test_apply_fsdp2_shards_each_prelude_and_coda_layer_the_looped_block_once_and_the_root(two_rank_run):
    sharded = two_rank_run["sharded"]
    assert sharded["units"] == ["", "model.coda.0", "model.prelude.0", "model.recurrent"]
    assert sharded["base_units"] == ["", "coda.0", "prelude.0", "recurrent"]  # a bare MythosModel
    # The looped block computes the halting probability, so its unit holds the halting head too.
    assert sharded["act_units"] == sharded["units"]


def test_fsdp2_keeps_lm_head_tied_to_the_embedding_through_training(two_rank_run):
    sharded = two_rank_run["sharded"]
    assert sharded["tied"]  # still one parameter after sharding and optimizer steps
    torch.testing.assert_close(sharded["state"]["lm_head.weight"], sharded["state"]["model.embed_tokens.weight"],
                               rtol=0, atol=0)


def test_fsdp2_on_two_processes_gives_the_losses_and_weights_of_one_process(two_rank_run):
    sharded = two_rank_run["sharded"]
    assert len(sharded["losses"]) == fsdp_worker.STEPS
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(two_rank_run["reference_losses"]),
                               rtol=1e-5, atol=0)
    assert_same_state(sharded["state"], two_rank_run["reference"])
    initial = fsdp_worker.build_model().state_dict()
    assert not torch.allclose(sharded["state"]["model.recurrent.layer.mlp.experts.down_proj"],
                              initial["model.recurrent.layer.mlp.experts.down_proj"])  # training moved the weights


def test_fsdp2_with_activation_checkpointing_matches_one_process(two_rank_run):
    torch.testing.assert_close(torch.tensor(two_rank_run["sharded"]["checkpointed_losses"]),
                               torch.tensor(two_rank_run["reference_losses"][:2]), rtol=1e-5, atol=0)


def test_fsdp2_with_halting_matches_one_process(two_rank_run):
    sharded = two_rank_run["sharded"]
    torch.testing.assert_close(torch.tensor(sharded["act_losses"]), torch.tensor(two_rank_run["act_reference_losses"]),
                               rtol=1e-5, atol=0)
    assert_same_state(sharded["act_state"], two_rank_run["act_reference"])


def test_router_bias_update_under_fsdp2_sums_loads_over_ranks_and_stays_identical(two_rank_run):
    sharded = two_rank_run["sharded"]
    rank0, rank1 = sharded["bias_per_rank"]
    assert torch.equal(rank0, rank1)
    expected = two_rank_run["reference"].model.recurrent.layer.mlp.gate.e_score_correction_bias
    assert expected.abs().sum() > 0  # the update moved the bias
    # Counts summed over both ranks equal the single process's counts, so the update is the same.
    torch.testing.assert_close(rank0, expected, rtol=0, atol=1e-7)
    assert sharded["expert_load_after_update"].sum() == 0


def test_apply_fsdp2_refuses_a_model_that_is_not_mythos():
    with pytest.raises(ValueError, match="MythosForCausalLM or MythosModel, got Linear"):
        apply_fsdp2(torch.nn.Linear(4, 4))


def test_accelerate_config_is_fsdp2_bf16_wrapping_the_looped_block(monkeypatch):
    from accelerate import FullyShardedDataParallelPlugin

    env = fsdp_worker.accelerate_launch_env(ACCELERATE_CONFIG)  # what `accelerate launch` hands each process
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert yaml.safe_load(ACCELERATE_CONFIG.read_text())["num_processes"] >= 2
    for key, value in env.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.transformer_cls_names_to_wrap == ["MythosDecoderLayer", "MythosRecurrence"]
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)  # trainer.save_model writes model.safetensors


def test_accelerate_wrap_classes_are_mythos_no_split_modules():
    names = yaml.safe_load(ACCELERATE_CONFIG.read_text())["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    # the same units as Trainer(fsdp=...)'s default, which wraps _no_split_modules
    assert names.split(",") == MythosPreTrainedModel._no_split_modules
    for name in names.split(","):
        assert isinstance(getattr(modeling_mythos, name, None), type), name


def test_accelerate_fsdp2_wrapping_with_the_example_config_trains_like_one_process(two_rank_run):
    """One wrapping policy: the example config makes exactly apply_fsdp2's units of the prelude, coda and recurrence
    (the recurrence's inner layer is no nested unit, which would add an all-gather per loop). With halting,
    truncated backprop and activation checkpointing, the losses are those of one process."""
    sharded = two_rank_run["sharded"]

    def layer_units(units):  # (Accelerate also groups the embedding, final norm and lm_head into a unit of its own)
        return {u for u in units if u.startswith(("model.prelude", "model.coda", "model.recurrent"))}

    assert layer_units(sharded["accelerate_units"]) == layer_units(sharded["units"]) == {
        "model.prelude.0", "model.coda.0", "model.recurrent"}
    torch.testing.assert_close(torch.tensor(sharded["accelerate_losses"]),
                               torch.tensor(two_rank_run["accelerate_reference_losses"]), rtol=1e-5, atol=0)
