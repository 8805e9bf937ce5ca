"""The Hugging Face Trainer trains MythosForCausalLM unchanged, with the recipe's callback."""

import functools

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from openmythos import MythosForCausalLM, mythos_tiny
from openmythos.training.data import SAMPLE_CORPUS, causal_lm_collator, pretraining_dataset
from openmythos.training.optim import MuonAdamW
from openmythos.tokenization_mythos import MythosTokenizer
from openmythos.training import MythosTrainingCallback


def corpus(seq_len=64):
    tokenizer = MythosTokenizer()
    return tokenizer, pretraining_dataset(tokenizer, seq_len, max_seq_len=128, data_files=[str(SAMPLE_CORPUS)],
                                          streaming=False)


def make_trainer(output_dir, max_steps, *, optimizer=None, grad_accum=1, bf16=False, **config):
    tokenizer, data = corpus()
    torch.manual_seed(0)
    model = MythosForCausalLM(mythos_tiny(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                          loop_sampling="poisson_lognormal", mean_train_loops=3, backprop_loops=2,
                                          **config))
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8,
                             gradient_accumulation_steps=grad_accum, learning_rate=3e-3, warmup_steps=2,
                             logging_steps=1, save_steps=3, seed=0, data_seed=0, report_to="none",
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, bf16=bf16)
    optimizers = (MuonAdamW.from_model(model, lr=3e-3), None) if optimizer == "muon" else (None, None)
    return Trainer(model=model, args=args, train_dataset=data, data_collator=causal_lm_collator,
                   callbacks=[MythosTrainingCallback()], optimizers=optimizers)


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def losses(trainer):
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_trainer_loss_falls_on_real_text(tmp_path, optimizer):
    trainer = make_trainer(tmp_path, 30, optimizer=optimizer)
    trainer.train()
    history = losses(trainer)
    first, last = sum(list(history.values())[:3]) / 3, sum(list(history.values())[-3:]) / 3
    assert last < first - 0.5, history
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert "moe/load_cv" in logged[-1] and "moe/loop0_max_share" in logged[-1]
    bias = trainer.model.model.recurrent.layer.mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0  # the balancing update ran after optimizer steps


def test_gradient_accumulation_passes_num_items_in_batch(tmp_path):
    seen = []
    trainer = make_trainer(tmp_path, 2, grad_accum=2)
    original = trainer.model.forward

    @functools.wraps(original)  # keeps forward's signature, which Trainer inspects
    def spy(*args, **kwargs):
        seen.append(kwargs.get("num_items_in_batch"))
        return original(*args, **kwargs)

    trainer.model.forward = spy
    trainer.train()
    assert seen and all(n is not None and int(n) == 2 * 8 * 63 for n in seen)


def record_loop_draws(trainer) -> list[tuple[int, int]]:
    """(optimizer step, n_loops) of every training forward, as the recurrence receives it."""
    draws = []

    def record(module, args):
        if module.training:
            draws.append((trainer.state.global_step, args[1].n_loops))  # the MythosLoopPlan

    trainer.model.model.recurrent.register_forward_pre_hook(record)
    return draws


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    full = make_trainer(tmp_path / "full", 6, grad_accum=2)
    full_draws = record_loop_draws(full)
    full.train()
    interrupted = make_trainer(tmp_path / "resumed", 6, grad_accum=2)
    interrupted.add_callback(StopAfter(3))  # the run dies after its step-3 checkpoint
    interrupted.train()
    assert interrupted.state.global_step == 3
    assert (tmp_path / "resumed" / "checkpoint-3" / "model.safetensors").exists()
    resumed = make_trainer(tmp_path / "resumed", 6, grad_accum=2)
    resumed_draws = record_loop_draws(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    # the loop-count draws continue exactly: every micro-batch of steps 4..6 runs the depth it ran uninterrupted
    assert resumed_draws == [d for d in full_draws if d[0] >= 3] and {s for s, _ in resumed_draws} == {3, 4, 5}
    assert len({n for _, n in full_draws}) > 1  # really sampled, not a constant
    expected, got = losses(full), losses(resumed)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got, expected)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_training_runs_under_autocast_with_fp32_weights(tmp_path):
    """TrainingArguments(bf16=True) trains with bf16 autocast (CPU autocast here, CUDA on a GPU); master weights stay
    fp32 and the loss stays finite and falls."""
    trainer = make_trainer(tmp_path, 12, bf16=True)
    seen = []
    trainer.model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    trainer.train()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    history = list(losses(trainer).values())
    assert all(torch.isfinite(torch.tensor(history))) and history[-1] < history[0]
