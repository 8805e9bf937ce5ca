"""The demo's run: build the looped model and its dense baselines, train them with the Trainer, score them, save and
reload the looped model, and write the results.

Imported by ``openmythos.demo.run`` only, so parsing the flags never imports torch. The task kind (``args.task``,
see ``openmythos.demo.tasks``) supplies everything that differs between tasks; nothing here branches on it.
"""

import argparse
import functools
import json
import math
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, ProgressCallback, Trainer, TrainingArguments, set_seed
from transformers.masking_utils import create_causal_mask
from transformers.trainer import DEFAULT_PROGRESS_CALLBACK
from transformers.utils import logging as hf_logging

from ..configuration_mythos import MythosConfig
from ..modeling_mythos import MythosForCausalLM, MythosLoopRecorder
from ..tokenization_mythos import MythosTokenizer
from ..training import MythosTrainingCallback
from . import task_of
from .files import claim_output_dir, save_folder_atomically, write_text_atomically
from .parallel import jobs, train_models
from .report import (EXIT, EXIT_LOOPS, LOOPED, SAME_COMPUTE, SAME_PARAMS, describe_training, format_table, plot,
                     summary, training_record)


# ------------------------------------------------------------------------------------------------------------ models
def looped_config(args, tokenizer, max_seq_len: int) -> MythosConfig:
    """A tiny looped model: one prelude block, one shared MoE block looped n_loops times, one coda block.

    The loop-index signal and the depth-wise LoRA are off: both are indexed by the loop number, and questions deeper
    than K would reach loop indices that training never used. Without them every iteration applies nearly the same
    map, which is what lets the model run more loops than it was trained with (the router's balancing bias keeps
    one row per loop up to ``max_loop_iters``; one row for all loops was tried, docs/demo.md). On the hidden task the
    default loop budget (``config.n_loops``) is ``--exit-budget``.
    """
    return MythosConfig(
        vocab_size=len(tokenizer), dim=args.dim, n_heads=args.heads, n_kv_heads=args.heads, attn_type="gqa",
        max_seq_len=max_seq_len, max_loop_iters=args.train_hops, prelude_layers=1, coda_layers=1,
        n_experts=4, n_shared_experts=1, n_experts_per_tok=2, expert_dim=args.dim, lora_rank=0,
        loop_signal_scale=0.0, rope_theta=10000.0, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        loop_kv_sharing=getattr(args, "loop_kv_sharing", "none"),
        # the hidden task's default budget is the exit rule's: a call with no n_loops may run that deep
        n_loops=getattr(args, "exit_budget", None),
        # and its exit rule's scope (what a position waits for before it stops: docs/adaptive_depth.md)
        exit_scope=getattr(args, "exit_scope", None) or "position",
        # --loop-state-norm: the state keeps its input's scale at every loop (docs/demo.md)
        loop_state_norm=bool(getattr(args, "loop_state_norm", None)),
    )


def dense_config(args, tokenizer, layers: int, ffn_dim: int, max_seq_len: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.dim, intermediate_size=ffn_dim, num_hidden_layers=layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max_seq_len,
        rope_theta=10000.0, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def build_models(args, tokenizer, task) -> dict[str, torch.nn.Module]:
    """The looped model and its two dense baselines.

    Same parameters: dense layers as wide as the looped model's prelude/coda, as many as bring the total closest to
    the looped model's. Same compute: one dense layer per block pass of the looped model at depth K (prelude, K loops,
    coda), each with the FFN width a token actually uses in the looped block (top-k routed plus shared experts).
    Every model gets the task's sequence length.
    """
    set_seed(args.seed)
    looped = MythosForCausalLM(looped_config(args, tokenizer, task.max_seq_len))
    cfg = looped.config
    target = looped.num_parameters()

    def dense(layers, ffn_dim):
        set_seed(args.seed)
        return LlamaForCausalLM(dense_config(args, tokenizer, layers, ffn_dim, task.max_seq_len))

    one_layer = dense(1, cfg.dense_ffn_dim).num_parameters()
    per_layer = dense(2, cfg.dense_ffn_dim).num_parameters() - one_layer
    same_params_layers = max(1, round((target - (one_layer - per_layer)) / per_layer))
    active_ffn = (cfg.n_experts_per_tok + cfg.n_shared_experts * cfg.n_experts_per_tok) * cfg.expert_dim
    passes = cfg.prelude_layers + args.train_hops + cfg.coda_layers
    return {
        LOOPED: looped,
        SAME_PARAMS: dense(same_params_layers, cfg.dense_ffn_dim),
        SAME_COMPUTE: dense(passes, active_ffn),
    }


def describe(name: str, model, args) -> str:
    if name == LOOPED:
        cfg = model.config
        return (f"looped: {cfg.prelude_layers} prelude + 1 shared MoE block x n_loops + {cfg.coda_layers} coda, "
                f"{model.num_parameters():,} parameters, {cfg.prelude_layers + args.train_hops + cfg.coda_layers} "
                f"block passes per token at n_loops={args.train_hops}")
    cfg = model.config
    return (f"{name}: {cfg.num_hidden_layers} dense layers (FFN {cfg.intermediate_size}), "
            f"{model.num_parameters():,} parameters, {cfg.num_hidden_layers} block passes per token")


# ---------------------------------------------------------------------------------------------------------- training
def collate(features: list[dict], pad_token_id: int, with_hops: bool = False, with_depths: bool = False) -> dict:
    """Right-pad questions of different lengths; padded labels are -100 and padded depths -1."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {
        "input_ids": torch.tensor([f["input_ids"] + [pad_token_id] * (width - len(f["input_ids"])) for f in features]),
        "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"]))
                                       for f in features]),
        "labels": torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in features]),
    }
    if with_hops:
        batch["hops"] = torch.tensor([f["hops"] for f in features])
    if with_depths:
        batch["depths"] = torch.tensor([f["depths"] + [-1] * (width - len(f["depths"])) for f in features])
    return batch


class InOrderTrainer(Trainer):
    """Trainer that reads the training set in order, not shuffled: the context task's curriculum is its row order."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class LoopsPerHopTrainer(Trainer):
    """Trainer for the looped model: each question runs ``n_loops = hops`` iterations.

    ``n_loops`` is one number per forward, so a batch is split by hop count; every group's loss is a sum divided by
    the batch's label count (``num_items_in_batch``), so the groups add up to the batch mean.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hops = inputs.pop("hops")
        labels = inputs["labels"]
        if num_items_in_batch is None:
            num_items_in_batch = (labels[:, 1:] != -100).sum()
        loss = 0.0
        for k in hops.unique().tolist():
            rows = hops == k
            out = model(input_ids=inputs["input_ids"][rows], attention_mask=inputs["attention_mask"][rows],
                        labels=labels[rows], n_loops=int(k), num_items_in_batch=num_items_in_batch)
            loss = loss + out.loss
        return (loss, None) if return_outputs else loss


def trace_targets(labels: torch.Tensor, depths: torch.Tensor, loops: int) -> torch.Tensor:
    """What the logits at every position learn after ``loops`` loops, in the labels' (shifted) layout.

    ``labels[:, p + 1]`` is the node position ``p`` stands for, ``depths[:, p]`` its hops from its question's start.
    After t loops a mark j hops in holds the node min(j, t) hops in: the label of the position ``j - t`` places to its
    left when j > t (the same question's mark t), its own label otherwise.
    """
    back = (depths - loops).clamp_min(0)  # [batch, seq]: how far left the target sits
    source = torch.arange(depths.shape[1], device=depths.device) - back
    targets = labels.clone()
    targets[:, 1:] = labels.gather(1, source[:, :-1] + 1)
    return targets


# the state noise's own generator: the same draws for every --seed, as in the five-seed check (docs/demo.md)
NOISE_SEED = 4321


class TraceTrainer(Trainer):
    """Trainer for the looped model on the hidden task: every loop's output is trained (trace supervision).

    A batch runs n_loops drawn uniformly (seeded) from its deepest question's hop count to that + ``extra_loops``.
    After each loop t the loop state goes through the coda, the final norm and the head, and every position learns
    the node ``trace_targets`` gives for t: the marks still waiting learn the node t hops on, the others their own
    node, which later loops must keep. The loss is the mean over loops of each loop's mean over the labels.

    ``state_noise`` > 0: in training, every loop's new state gets Gaussian noise of that size relative to each
    position's root-mean-square (a forward hook on the injection, added at the first step), so that the one-hop step
    cannot lean on how many loops ran (docs/demo.md, "State noise").

    ``arrival_weight``: the loss term of the mark the wave reaches at loop t (the mark t hops in, whose node is new
    at loop t and must then stay) counts this many times. ``moving_weight``: every mark whose target changes at loop
    t (the arriving one and those still waiting, which hold the front) counts this many times; on the arriving mark
    the two multiply. The sum is still divided by the number of labels, so weights of 1 give the plain mean
    (docs/demo.md, "Loss weights on the moving marks").
    """

    def __init__(self, *args, extra_loops: int, loop_seed: int, state_noise: float = 0.0, arrival_weight: float = 1.0,
                 moving_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_loops = extra_loops
        self.loop_draws = random.Random(loop_seed)
        self.state_noise = state_noise
        self.noise_draws = None
        self.arrival_weight, self.moving_weight = arrival_weight, moving_weight

    def _add_state_noise(self, module, args, state):
        if not module.training:
            return state
        rms = state.pow(2).mean(-1, keepdim=True).sqrt().detach()
        noise = torch.randn(state.shape, generator=self.noise_draws, device="cpu").to(state.device, state.dtype)
        return state + self.state_noise * rms * noise

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.state_noise > 0 and self.noise_draws is None:
            self.noise_draws = torch.Generator().manual_seed(NOISE_SEED)
            model.model.recurrent.injection.register_forward_hook(self._add_state_noise)
        depths, labels = inputs.pop("depths"), inputs.pop("labels")
        deepest = max(1, int(depths.max()))
        n_loops = self.loop_draws.randint(deepest, deepest + self.extra_loops)
        out = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], n_loops=n_loops,
                          output_hidden_states=True, use_cache=False)
        states = torch.cat(loop_states(model, out.hidden_states, n_loops))  # [n_loops * batch, seq, dim], loop-major
        logits = read_out(model, states)
        targets = torch.cat([trace_targets(labels, depths, t) for t in range(1, n_loops + 1)])
        logits, targets = logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten()
        if self.arrival_weight == 1 and self.moving_weight == 1:
            loss = F.cross_entropy(logits, targets, ignore_index=-100)
        else:  # logits at position p answer for depths[:, p]: the wave reaches it at loop t == its depth
            loop = torch.arange(1, n_loops + 1, device=depths.device)[:, None, None]  # [n_loops, 1, 1], loop-major
            depth = depths[None, :, :-1]
            weights = (torch.where(depth == loop, self.arrival_weight, 1.0)
                       * torch.where(depth >= loop, self.moving_weight, 1.0)).flatten()
            labelled = targets != -100
            loss = (F.cross_entropy(logits, targets, ignore_index=-100, reduction="none") * weights * labelled).sum() \
                / labelled.sum()
        return (loss, None) if return_outputs else loss


def loop_states(model, hidden_states: tuple, n_loops: int) -> tuple:
    """The state after each of the ``n_loops`` loops, from a forward's ``hidden_states`` (embeddings, one per
    prelude layer, one per loop, one per coda layer)."""
    first = 1 + model.config.prelude_layers
    return hidden_states[first:first + n_loops]


def read_out(model, states: torch.Tensor) -> torch.Tensor:
    """The logits the coda, final norm and head give for loop states [batch, seq, dim] (right-padded rows: the
    causal mask alone keeps padding out of every real position)."""
    inner = model.model
    positions = torch.arange(states.shape[1], device=states.device).unsqueeze(0)
    shared = {"position_embeddings": inner.rotary_emb(states, positions),
              "attention_mask": create_causal_mask(inner.config, states, None, None, position_ids=positions),
              "cache": None}
    h = states
    for layer in inner.coda:
        h = layer(h, **shared)
    return model.lm_head(inner.norm(h))


class InOrderLoopsPerHopTrainer(InOrderTrainer, LoopsPerHopTrainer):
    """The looped model's trainer for a curriculum: batches in dataset order, each hop group with n_loops = hops."""


class BarOnlyProgressCallback(ProgressCallback):
    """The Trainer's tqdm progress bar without the raw log dict it prints at every logging step.

    The logs still reach ``trainer.state.log_history``; ``train`` prints one readable summary line from them.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


# which Trainer trains a model: (looped model?, training set read in order?) -> class
TRAINERS = {(False, False): Trainer, (True, False): LoopsPerHopTrainer,
            (False, True): InOrderTrainer, (True, True): InOrderLoopsPerHopTrainer}


def train(name: str, model, dataset, tokenizer, task, args, progress_bar: bool = True) -> dict:
    looped = name == LOOPED
    steps = args.steps if looped else args.baseline_steps
    if steps == 0:
        return training_record(0, 0.0, [])
    training_args = TrainingArguments(
        output_dir=str(Path(args.output_dir) / "trainer" / name), max_steps=steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        warmup_steps=max(1, steps // 10), weight_decay=0.0, adam_beta2=0.98, max_grad_norm=1.0,
        logging_steps=max(1, steps // 10), save_strategy="no", report_to="none", seed=args.seed,
        data_seed=args.seed, remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(), **task.lr_schedule(),
    )
    trace = looped and task.convergent
    extra = {"extra_loops": args.extra_loops, "loop_seed": args.seed,
             "state_noise": getattr(args, "state_noise", None) or 0.0,  # the weights are > 0 when given
             "arrival_weight": getattr(args, "arrival_weight", None) or 1.0,
             "moving_weight": getattr(args, "moving_weight", None) or 1.0} if trace else {}
    trainer = (TraceTrainer if trace else TRAINERS[looped, task.in_order])(
        model=model, args=training_args, train_dataset=dataset,
        data_collator=lambda features: collate(features, tokenizer.pad_token_id, with_hops=looped and not trace,
                                               with_depths=trace),
        callbacks=[MythosTrainingCallback()] if looped else None, **extra,
    )
    trainer.remove_callback(DEFAULT_PROGRESS_CALLBACK)  # it prints every log dict, moe/... keys included
    if progress_bar:
        trainer.add_callback(BarOnlyProgressCallback())
    where = "" if progress_bar else " (in a second process)"
    print(f"\nTraining {describe(name, model, args)}{where}", flush=True)
    start = time.perf_counter()
    trainer.train()
    record = training_record(steps, time.perf_counter() - start, trainer.state.log_history)
    # from the second process, start a line of its own: the first one's progress bar holds the current one
    print(("" if progress_bar else "\n") + describe_training(name, record), flush=True)
    return record


# -------------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def accuracy(model, questions: list[tuple[str, str]], tokenizer, n_loops: int | None = None, **loop_options) -> float:
    """Exact accuracy: the answer is the model's most likely next token after the question (questions of one
    hop count have one length). ``loop_options`` (``exit_criterion``, ``exit_threshold``) go to the forward."""
    return answer(model, questions, tokenizer, n_loops, **loop_options)[0]


@torch.no_grad()
def answer(model, questions: list[tuple[str, str]], tokenizer, n_loops: int | None = None, **loop_options):
    """(exact accuracy, mean loops the last position ran or None for a dense model) over ``questions``."""
    model.eval()
    answers = [tokenizer.encode(a, add_special_tokens=False)[0] for _, a in questions]
    input_ids = torch.tensor([tokenizer.encode(q, add_special_tokens=False) for q, _ in questions],
                             device=model.device)
    kwargs = {"n_loops": n_loops} if n_loops is not None else {}
    out = model(input_ids=input_ids, use_cache=False, logits_to_keep=1, **kwargs, **loop_options)
    right = (out.logits[:, -1].argmax(-1).cpu() == torch.tensor(answers)).float().mean().item()
    loops = getattr(out, "loops_used", None)
    return right, None if loops is None else loops[:, -1].float().mean().item()


# what each exit criterion measures, for the console
EXIT_MEASURES = {"kl": "KL divergence between its successive next-token distributions",
                 "delta": "relative state change"}


@torch.no_grad()
def choose_exit_threshold(model, questions: list[tuple[str, str]], tokenizer, budget: int,
                          criterion: str = "kl") -> dict:
    """The exit rule's threshold, from training questions only (``x`` then k marks, k <= K).

    Each question runs ``budget`` loops with per-loop statistics: the ``criterion``'s measure at every loop (for
    ``"kl"``, the KL divergence between successive loops' next-token distributions; for ``"delta"``, the relative
    state change). A position j hops in (the start node counts as 1: its first loop moves it too) should change at
    loops 1..j and stay put from loop j + 1 on. The threshold lies a quarter of the way from the largest value once
    settled to the smallest while moving, on a log scale: closer to the settled side, because stopping a loop late
    costs a loop and stopping early costs the answer, and the marks far from the start node (deeper than any
    training question) move less than the ones training shows. ``separated`` says whether the smallest moving value
    is above the largest settled one (a threshold then splits them exactly).
    """
    model.eval()
    moving, settled = [], []
    by_length = {}
    for q, _ in questions:
        by_length.setdefault(len(q), []).append(q)
    # every position runs the whole budget: threshold 0 only records the KL ("delta" is recorded without a rule)
    options = {"exit_criterion": "kl", "exit_threshold": 0.0} if criterion == "kl" else {}
    for group in by_length.values():
        input_ids = torch.tensor([tokenizer.encode(q, add_special_tokens=False) for q in group], device=model.device)
        out = model(input_ids=input_ids, n_loops=budget, output_loop_stats=True, use_cache=False, **options)
        stats = out.loop_stats.kl if criterion == "kl" else out.loop_stats.state_change
        values = stats.float().cpu()  # [loops, batch, seq]; the KL is NaN at the first loop (nothing to compare)
        depth = torch.arange(values.shape[2]).clamp_min(1)
        still = (torch.arange(1, values.shape[0] + 1)[:, None] <= depth[None, :])[:, None, :].expand_as(values)
        seen = ~values.isnan()
        moving.append(values[still & seen])
        settled.append(values[~still & seen])
    smallest, largest = float(torch.cat(moving).min()), float(torch.cat(settled).max())
    floor = 1e-12
    threshold = math.exp(0.75 * math.log(max(largest, floor)) + 0.25 * math.log(max(smallest, floor)))
    return {"criterion": criterion, "threshold": threshold, "budget": budget,
            "smallest_change_while_moving": smallest, "largest_change_once_settled": largest,
            "separated": smallest > largest}


def evaluate(models, task, tokenizer, args, exit_rule: dict | None = None) -> dict:
    """Accuracy per hop count: the looped model at every n_loops (and, with ``exit_rule``, under that rule, with the
    mean loops its answer position ran), the dense models once."""
    hop_range = range(1, args.eval_hops + 1)
    questions = {k: task.eval_questions(k, args) for k in hop_range}
    table = {f"{LOOPED}@{n}": [accuracy(models[LOOPED], questions[k], tokenizer, n) for k in hop_range]
             for n in range(1, args.max_loops + 1)}
    # n_loops = hops is the diagonal of the columns above; only depths past --max-loops need their own run
    table[f"{LOOPED}@hops"] = [table[f"{LOOPED}@{k}"][k - 1] if k <= args.max_loops
                               else accuracy(models[LOOPED], questions[k], tokenizer, k) for k in hop_range]
    if exit_rule is not None:
        # no hop count: the budget and the rule decide the depth
        runs = [answer(models[LOOPED], questions[k], tokenizer, exit_rule["budget"],
                       exit_criterion=exit_rule["criterion"], exit_threshold=exit_rule["threshold"])
                for k in hop_range]
        table[EXIT] = [right for right, _ in runs]
        table[EXIT_LOOPS] = [loops for _, loops in runs]
    for name in (SAME_PARAMS, SAME_COMPUTE):
        table[name] = [accuracy(models[name], questions[k], tokenizer) for k in hop_range]
    return table


@torch.no_grad()
def wave(model, task, tokenizer, args) -> dict:
    """How the looped model's marks follow their trace, loop by loop, on the deepest questions (every start node).

    Each loop's state goes through the coda and the head (``read_out``, as in training). After t loops mark j should
    hold the node min(j, t) links on: its own node once the wave has reached it (t >= j), else the wave front, the
    node t links on. ``right[j - 1][t - 1]`` is the share of questions where mark j holds it. A causal model's mark j
    of a deep question is the last mark of the j-hop question, so the cells with t >= j are the fixed-loop accuracy
    table's; the cells with t < j show whether the waiting marks keep the front (docs/demo.md, "Why some seeds
    arrive late").
    """
    model.eval()
    hops, loops = args.eval_hops, args.max_loops
    input_ids = torch.tensor([tokenizer.encode(task.question(x, hops), add_special_tokens=False)
                              for x in task.nodes], device=model.device)
    # [questions, hops + 1]: the node min(j, t) links on is column min(j, t) of each question's trace
    nodes = torch.tensor([tokenizer.encode(task.trace(x, hops), add_special_tokens=False) for x in task.nodes])
    out = model.model(input_ids=input_ids, n_loops=loops, output_hidden_states=True, use_cache=False)
    marks = torch.arange(1, hops + 1)
    right = [(read_out(model, state).argmax(-1).cpu()[:, 1:] == nodes[:, marks.clamp(max=t)]).float().mean(0)
             for t, state in enumerate(loop_states(model, out.hidden_states, loops), start=1)]
    return {"hops": hops, "right": torch.stack(right, 1).tolist()}  # [marks, loops]


def answer_samples(folder: Path, task, args, exit_rule: dict | None = None) -> list[dict]:
    """Reload the saved looped model through the Auto classes and answer questions with ``generate``: with the exit
    rule and no n_loops (the saved default budget) when there is one, else with ``n_loops=hops``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    depths = sorted({1, args.train_hops, min(args.train_hops + 2, args.eval_hops), args.eval_hops})
    samples = []
    for i in range(args.samples):
        hops = depths[i % len(depths)]
        prompt, expected = task.sample_question(i, hops, args)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        loop_options = {"n_loops": hops} if exit_rule is None else {
            "exit_criterion": exit_rule["criterion"], "exit_threshold": exit_rule["threshold"]}
        recorder = MythosLoopRecorder()
        # the answer is one node name: one new token
        out = model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             loop_recorder=recorder, **loop_options)
        reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        sample = {"question": prompt, "hops": hops, "answer": reply, "expected": expected}
        if exit_rule is None:
            sample["n_loops"] = hops
        else:  # the loops the position that chose the answer ran
            sample["loops_used"] = int(recorder.token_loops()[0, 0])
        samples.append(sample)
    return samples


def environment(args) -> dict:
    """What besides the seed the numbers depend on (same values here, same table), and the training processes
    (``--jobs``), which do not change them."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": device, "platform": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version(), "training_processes": jobs(args)}


# -------------------------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    out = Path(args.output_dir)
    claim_output_dir(out)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    tokenizer = MythosTokenizer()
    task = task_of(args)
    print(task.introduction(args))
    env = environment(args)
    print(f"Seed {args.seed}; torch {env['torch']}, {env['torch_threads']} CPU thread(s), {env['cpu_capability']} "
          f"kernels, {env['device']}, {env['platform']}. The same seed gives the same table on this machine with "
          f"this torch version and thread count; other CPUs can round differently.")
    dataset = task.training_set(tokenizer, args)
    models = build_models(args, tokenizer, task)
    # with 2 jobs the dense baselines train in a second process beside the looped model
    train_one = functools.partial(train, dataset=dataset, tokenizer=tokenizer, task=task, args=args)
    training = train_models(models, train_one, [] if args.baseline_steps == 0 else [SAME_PARAMS, SAME_COMPUTE], args)

    exit_rule = None
    if task.convergent and args.loop_kv_sharing != "none":
        print("\nNo exit rule: exit criteria need loop_kv_sharing='none' (the looped model is scored at fixed n_loops "
              "only).")
    elif task.convergent:
        exit_rule = choose_exit_threshold(models[LOOPED], task.exit_questions(args), tokenizer, args.exit_budget,
                                          args.exit_criterion)
        wait = {"prefix": " and every earlier position has stopped",
                "row": ", for every position of the question at once"}.get(models[LOOPED].config.exit_scope, "")
        print(f"\nExit rule: a position stops once its {EXIT_MEASURES[exit_rule['criterion']]} is below "
              f"{exit_rule['threshold']:.3g}{wait} (chosen on the training questions: smallest while moving "
              f"{exit_rule['smallest_change_while_moving']:.3g}, largest once settled "
              f"{exit_rule['largest_change_once_settled']:.3g}), at most {exit_rule['budget']} loops.")
    table = evaluate(models, task, tokenizer, args, exit_rule)
    marks = wave(models[LOOPED], task, tokenizer, args) if task.convergent else None
    text = format_table(table, args)
    print(f"\nAccuracy ({task.scored(args)}, exact):\n" + text)
    write_text_atomically(out / "accuracy.md", text + "\n")
    if not args.no_plot:
        plot(table, args, out / "accuracy.png", task.plot_title(args))

    folder = out / "looped-model"

    def save(tmp):
        models[LOOPED].save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # what the model was trained on, for tools that score it later (benchmarks/adaptive_depth.py)
        (tmp / "demo_task.json").write_text(json.dumps(task.describe(args, exit_rule), indent=2) + "\n")

    kept = save_folder_atomically(folder, save)
    if kept is not None:
        print(f"\nThe previous {folder} held files the demo did not write; it is kept as {kept}.")
    samples = answer_samples(folder, task, args, exit_rule)
    how = "generate(n_loops=hops)" if exit_rule is None else (
        f"generate(exit_criterion={exit_rule['criterion']!r}, exit_threshold={exit_rule['threshold']:.3g}), "
        f"no n_loops")
    print(f"\nSample questions, answered by the reloaded model ({folder}) with {how}:")
    for s in samples:
        verdict = "right" if s["answer"] == s["expected"] else f"wrong, expected {s['expected']!r}"
        loops = f", {s['loops_used']} loops" if "loops_used" in s else ""
        print(f"  {s['question']!r} ({s['hops']} hops{loops}) -> {s['answer']!r} ({verdict})")

    results = {
        "settings": {k: v for k, v in vars(args).items()},
        "models": {name: describe(name, m, args) for name, m in models.items()},
        "parameters": {name: m.num_parameters() for name, m in models.items()},
        "train_seconds": {name: record["seconds"] for name, record in training.items()},
        "training": training,
        "environment": env,
        "hops": list(range(1, args.eval_hops + 1)),
        "accuracy": table,
        "exit_rule": exit_rule,
        "wave": marks,
        "summary": summary(table, args),
        "samples": samples,
        "total_seconds": time.perf_counter() - started,
    }
    write_text_atomically(out / "results.json", json.dumps(results, indent=2) + "\n")
    s = results["summary"]
    print(f"\nLooped model: {s['looped_in_distribution']:.0%} on 1..{args.train_hops} hops; at {args.eval_hops} hops "
          f"{s['looped_at_eval_hops_with_n_loops_eq_hops']:.0%} with n_loops={args.eval_hops} vs "
          f"{s['looped_at_eval_hops_with_training_depth']:.0%} with n_loops={args.train_hops}. "
          f"Dense, same params: {s['dense_same_params_at_eval_hops']:.0%}; dense, same compute: "
          f"{s['dense_same_compute_at_eval_hops']:.0%} at {args.eval_hops} hops.")
    if exit_rule is not None:
        print(f"Exit rule (no hop count given): lowest accuracy over 1..{args.eval_hops} hops "
              f"{s['exit_rule_lowest']:.0%}, at most {s['exit_rule_most_loops_past_hops']:.2f} loops past the hop "
              f"count on average. Fixed n_loops >= hops: lowest {s['fixed_loops_at_or_past_hops_lowest']:.0%}.")
    print(f"Wrote {out / 'results.json'}, {out / 'accuracy.md'}"
          + ("" if args.no_plot else f", {out / 'accuracy.png'}") + f" in {results['total_seconds']:.0f} s.")
    return results
