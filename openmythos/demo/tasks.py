"""Synthetic multi-hop reasoning: k-hop pointer chasing over a hidden random graph.

A seeded random permutation links every node (a letter) to its successor, forming one cycle through all nodes, so
``follow(x, k)`` differs for every k below the number of nodes: a model that stops one hop early or late is wrong.
The links are never shown: a question is the start node followed by one ``+`` per hop (``"q+++"`` asks for the node
three links after ``q``), and the answer is read at the last mark, so answering needs exactly k composed lookups of
facts the model has to learn. Writing the hop count in unary keeps every token of a deeper question one that training
has seen.

Every mark is supervised, not only the last: the j-th mark's label is the node j links after the start (a latent
scratchpad). A looped model can then learn a rule that is the same at every position and needs no count: each loop,
a mark takes the node one link after the one its left neighbour holds. After t loops the j-th mark holds the node
min(j, t) links on, so the last mark of a k-hop question stops changing after k loops (an exit rule can see that) and
more loops leave it alone; a deeper question only has more marks. Training rows pack several questions into one
sequence, so the rule is learned at many positions and distances, not only at the first five.

``InContextPointerChasingTask`` is the in-context variant: the links are written in the prompt, a new graph for every
example, so the model has to learn the lookup procedure rather than the graph.

Each task kind also carries what ``mythos demo --task <kind>`` needs to know about it: its flag defaults, sequence
length, learning-rate schedule, training set, evaluation questions and console text (the methods taking ``args``, the
demo's parsed flags). The demo itself is the same code for every kind. This module imports only the standard library
(``datasets`` inside the functions that build datasets), so the demo's argument parsing stays free of torch.
"""

import random
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

NODE_NAMES = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
HOP_MARK = "+"


@dataclass(frozen=True)
class PointerChasingTask:
    """k-hop pointer chasing over one random cycle of ``num_nodes`` letters, fixed by ``seed``.

    Args:
        num_nodes (`int`, defaults to 24): Nodes in the hidden graph, 2 to 52 (the letters a-z, A-Z).
        seed (`int`, defaults to 0): Seed of the graph. The same seed always gives the same graph.
    """

    num_nodes: int = 24
    seed: int = 0

    # The demo's settings for this kind (``--task hidden``). ``flag_defaults`` fill the flags left at None.
    flag: ClassVar[str] = "hidden"
    flag_defaults: ClassVar[dict] = {"num_nodes": 24, "dim": 96, "steps": 1700, "lr": 2e-3, "train_examples": 20000,
                                     "curriculum_steps": 0, "max_loops": 16, "pack": 3, "extra_loops": 4,
                                     "exit_budget": 16, "exit_criterion": "kl", "exit_scope": "row"}
    max_seq_len: ClassVar[int] = 64
    # the Trainer shuffles the training set: its row order means nothing
    in_order: ClassVar[bool] = False
    # the looped model learns every mark's node after every loop (trace supervision) and is also scored with an exit
    # rule that is given no hop count (see openmythos.demo.pipeline)
    convergent: ClassVar[bool] = True

    def __post_init__(self):
        if isinstance(self.num_nodes, bool) or not isinstance(self.num_nodes, int) \
                or not 2 <= self.num_nodes <= len(NODE_NAMES):
            raise ValueError(f"`num_nodes` must be an integer from 2 to {len(NODE_NAMES)}, got {self.num_nodes!r}")

    @property
    def nodes(self) -> str:
        return NODE_NAMES[: self.num_nodes]

    @cached_property
    def successor(self) -> dict[str, str]:
        """The hidden links: one cycle through every node, in a seeded random order."""
        return random_cycle(self.nodes, random.Random(self.seed))

    def follow(self, start: str, hops: int) -> str:
        """The node reached from ``start`` after ``hops`` links."""
        return follow(self.successor, start, hops)

    @staticmethod
    def question(start: str, hops: int) -> str:
        """The start node, then one mark per hop: ``question("q", 3) == "q+++"``."""
        return start + HOP_MARK * _check_hops(hops)

    def trace(self, start: str, hops: int) -> str:
        """The nodes 0, 1, ..., ``hops`` links after ``start``: what each position of the question is trained to
        hold (the start node itself, then one node per mark; the last is the answer)."""
        return "".join(self.follow(start, j) if j else start for j in range(_check_hops(hops) + 1))

    def examples(self, hops: Iterable[int], num_examples: int, seed: int = 0) -> list[dict]:
        """``num_examples`` questions with start nodes and hop counts drawn uniformly (seeded) from ``hops``."""
        hop_choices = _hop_choices(hops)
        rng = random.Random(seed)
        rows = []
        for _ in range(num_examples):
            start, k = rng.choice(self.nodes), rng.choice(hop_choices)
            rows.append({"question": self.question(start, k), "answer": self.follow(start, k), "hops": k})
        return rows

    def dataset(self, tokenizer, hops: Iterable[int], num_examples: int, seed: int = 0, pack: int = 1):
        """A ``datasets.Dataset`` of tokenized training rows, each 1..``pack`` questions (uniform, seeded) written
        one after another, e.g. ``"q+++c+h++"``.

        ``input_ids`` is the questions, then the last question's answer. ``labels`` (the usual one-token shift:
        ``labels[p + 1]`` is what the logits at position ``p`` learn) holds, for every position, the node it stands
        for: a start node itself, and at the j-th mark of a question the node j links after its start, so every mark
        is supervised with its intermediate node and the last mark with the answer. ``depths[p]`` is the hops done at
        position ``p`` (0 at a start node, j at the j-th mark, -1 at the trailing answer, which has no label).
        ``question`` is the row's text, ``hops`` its deepest question's hop count.
        """
        import datasets

        if isinstance(pack, bool) or not isinstance(pack, int) or pack < 1:
            raise ValueError(f"`pack` must be a positive integer, got {pack!r}")
        hop_choices = _hop_choices(hops)
        rng = random.Random(seed)
        rows = []
        for _ in range(num_examples):
            questions = [(rng.choice(self.nodes), rng.choice(hop_choices)) for _ in range(rng.randint(1, pack))]
            text = "".join(self.question(start, k) for start, k in questions)
            nodes = "".join(self.trace(start, k) for start, k in questions)
            ids = tokenizer.encode(text, add_special_tokens=False)
            node_ids = tokenizer.encode(nodes, add_special_tokens=False)
            rows.append({"input_ids": ids + node_ids[-1:], "labels": [-100] + node_ids,
                         "depths": [j for _, k in questions for j in range(k + 1)] + [-1],
                         "question": text, "hops": max(k for _, k in questions)})
        return datasets.Dataset.from_list(rows)

    # ------------------------------------------------------------------------------- the demo (``--task hidden``)
    @classmethod
    def from_args(cls, args) -> "PointerChasingTask":
        return cls(num_nodes=args.num_nodes, seed=args.seed)

    @staticmethod
    def check_args(args) -> str | None:
        """The demo's refusal of flags this kind cannot use together, or None."""
        longest = args.pack * (args.train_hops + 1) + 1
        if longest > PointerChasingTask.max_seq_len:
            return (f"--pack {args.pack} questions of up to --train-hops {args.train_hops} hops make rows of "
                    f"{longest} tokens, more than the {PointerChasingTask.max_seq_len} the models hold")
        return None

    @staticmethod
    def lr_schedule() -> dict:
        """``TrainingArguments`` fields of the learning-rate schedule: cosine decay to 0."""
        return {"lr_scheduler_type": "cosine"}

    def training_set(self, tokenizer, args):
        """``--train-examples`` rows of 1..``--pack`` questions with 1..K hops each (shuffled by the Trainer)."""
        return self.dataset(tokenizer, range(1, args.train_hops + 1), args.train_examples, seed=args.seed,
                            pack=args.pack)

    def exit_questions(self, args) -> list[tuple[str, str]]:
        """The questions the exit rule's threshold is chosen on: training questions only (every start node at
        1..K hops), so the deeper rows stay held out."""
        return [pair for k in range(1, args.train_hops + 1) for pair in self.eval_questions(k, args)]

    def eval_questions(self, hops: int, args) -> list[tuple[str, str]]:
        """(question, answer) pairs scored at ``hops`` hops: every start node of the hidden graph."""
        return [(self.question(start, hops), self.follow(start, hops)) for start in self.nodes]

    def sample_question(self, i: int, hops: int, args) -> tuple[str, str]:
        """The ``i``-th question the reloaded model answers after training, and its answer."""
        start = self.nodes[(7 * i + 3) % self.num_nodes]
        return self.question(start, hops), self.follow(start, hops)

    def introduction(self, args) -> str:
        return (f"Task: {self.num_nodes} nodes on one hidden random cycle; '{self.question('q', 3)}' asks for the "
                f"node 3 links after 'q', read at the last mark (every mark learns its intermediate node). Training "
                f"on 1..{args.train_hops} hops (1..{args.pack} questions per row), testing on 1..{args.eval_hops}.")

    @staticmethod
    def scored(args) -> str:
        """What each accuracy is measured over, for the table's heading."""
        return "every start node"

    def describe(self, args, exit_rule: dict | None) -> dict:
        """What a saved model was trained on (its folder's ``demo_task.json``): enough to rebuild the questions."""
        return {"task": self.flag, "num_nodes": self.num_nodes, "seed": self.seed, "train_hops": args.train_hops,
                "eval_hops": args.eval_hops, "exit_rule": exit_rule}

    @staticmethod
    def plot_title(args) -> str:
        return f"k-hop pointer chasing over a hidden {args.num_nodes}-node cycle"


class InContextPointerChasingTask:
    """k-hop pointer chasing over a graph written in the prompt, a new random graph for every example.

    A prompt lists the links of one random cycle in shuffled order, then ``|``, then one ``+`` per hop, then the
    query nodes: ``"c>a a>d d>b b>c|++da"`` asks for the nodes two links after ``d`` and after ``a``. Nothing about a
    graph can be memorised: every answer has to be looked up in the context, k times over.

    Training prompts query every node of their graph (in random order) and the graph size varies from
    ``max(3, k + 1)`` to ``max_nodes``; evaluation prompts (``eval_examples``) query one node of a ``max_nodes`` graph,
    in the hidden task's ``...|+++x`` format. Both are fixed by their seed.

    Args:
        max_nodes (`int`, defaults to 9): Most nodes in a graph, 3 to 52; the names are drawn from its first letters.
        seed (`int`, defaults to 0): Default seed of ``examples``, ``dataset`` and ``eval_examples``.
    """

    # The demo's settings for this kind (``--task context``): the recipe that makes the looped model learn it
    # (docs/demo.md). ``train_examples`` None: one batch per optimizer step.
    flag = "context"
    flag_defaults = {"num_nodes": 9, "dim": 64, "steps": 1200, "lr": 3e-3, "train_examples": None,
                     "curriculum_steps": 300}
    max_seq_len = 128  # longer than the hidden task's 64: the prompt also holds the graph's links
    # the Trainer reads the training set in row order: the curriculum (1-hop batches first) is that order
    in_order = True
    # trained with n_loops = hops and scored at fixed loop counts only (its recipe predates the convergent one)
    convergent = False

    def __init__(self, max_nodes: int = 9, seed: int = 0):
        if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or not 3 <= max_nodes <= len(NODE_NAMES):
            raise ValueError(f"`max_nodes` must be an integer from 3 to {len(NODE_NAMES)}, got {max_nodes!r}")
        self.max_nodes, self.seed = max_nodes, seed

    @property
    def names(self) -> str:
        return NODE_NAMES[: self.max_nodes]

    def min_nodes(self, hops: int) -> int:
        """The smallest graph used for ``hops``-hop training prompts (k + 1 nodes, so no k-hop answer is the start)."""
        return max(3, _check_hops(hops) + 1)

    def _check_fits(self, hops: int) -> int:
        if self.min_nodes(hops) > self.max_nodes:
            raise ValueError(f"{hops}-hop prompts need graphs of at least {self.min_nodes(hops)} nodes, but "
                             f"`max_nodes` is {self.max_nodes}")
        return hops

    def example(self, rng: random.Random, hops: int, num_nodes: int, num_queries: int | None = None) -> dict:
        """One prompt over a fresh ``num_nodes``-node cycle with ``num_queries`` queries (default: every node)."""
        order = rng.sample(self.names, num_nodes)
        successor = random_cycle(order, rng)
        edges = list(successor)
        rng.shuffle(edges)
        queries = rng.sample(edges, num_nodes if num_queries is None else num_queries)
        context = " ".join(f"{s}>{successor[s]}" for s in edges) + "|" + HOP_MARK * hops
        return {"context": context, "queries": "".join(queries),
                "answers": "".join(follow(successor, q, hops) for q in queries), "hops": hops,
                "num_nodes": num_nodes}

    def examples(self, hops: Iterable[int], num_examples: int, seed: int | None = None, group_size: int = 1):
        """``num_examples`` training prompts querying every node; each run of ``group_size`` consecutive prompts
        shares one hop count (uniform over ``hops``) and one graph size (uniform over ``min_nodes(k)..max_nodes``),
        so a batch of that size can run one ``n_loops`` and needs no padding."""
        hop_choices = [self._check_fits(k) for k in _hop_choices(hops)]
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"`group_size` must be a positive integer, got {group_size!r}")
        rng = random.Random(self.seed if seed is None else seed)
        rows = []
        while len(rows) < num_examples:
            k = rng.choice(hop_choices)
            n = rng.randint(self.min_nodes(k), self.max_nodes)
            rows += [self.example(rng, k, n) for _ in range(min(group_size, num_examples - len(rows)))]
        return rows

    def dataset(self, tokenizer, hops: Iterable[int], num_examples: int, seed: int | None = None,
                group_size: int = 1):
        """A ``datasets.Dataset`` of tokenized training prompts (see ``examples``) for causal-LM training.

        ``input_ids`` is the context, the queries and an eos. ``labels`` is -100 except one position after each
        query, which holds that query's answer: with the usual one-token shift of causal-LM labels, the logits at a
        query are trained to predict its answer. Also holds ``hops``, ``num_nodes``, ``context``, ``queries`` and
        ``answers``.
        """
        import datasets

        rows = self.examples(hops, num_examples, seed, group_size)
        for row in rows:
            context = tokenizer.encode(row["context"], add_special_tokens=False)
            queries = tokenizer.encode(row["queries"], add_special_tokens=False)
            answers = tokenizer.encode(row["answers"], add_special_tokens=False)
            row["input_ids"] = context + queries + [tokenizer.eos_token_id]
            row["labels"] = [-100] * (len(context) + 1) + answers
        return datasets.Dataset.from_list(rows)

    def eval_examples(self, hops: int, num_examples: int, seed: int | None = None) -> list[dict]:
        """``num_examples`` single-query questions ``"<links>|+++x"`` over fresh ``max_nodes``-node graphs."""
        self._check_fits(hops)
        rng = random.Random(f"eval-{self.seed if seed is None else seed}-{hops}")
        rows = []
        for _ in range(num_examples):
            row = self.example(rng, hops, self.max_nodes, num_queries=1)
            rows.append({"question": row["context"] + row["queries"], "answer": row["answers"], "hops": hops})
        return rows

    # ------------------------------------------------------------------------------ the demo (``--task context``)
    @classmethod
    def from_args(cls, args) -> "InContextPointerChasingTask":
        return cls(max_nodes=args.num_nodes, seed=args.seed)

    @staticmethod
    def check_args(args) -> str | None:
        """The demo's refusal of flags this kind cannot use together, or None."""
        if args.train_examples < args.curriculum_steps * args.batch_size:
            return "--train-examples must cover the --curriculum-steps batches"
        for name in ("pack", "extra_loops", "exit_budget", "exit_criterion", "exit_scope", "state_noise",
                     "arrival_weight", "moving_weight", "loop_state_norm"):
            if getattr(args, name) is not None:
                return f"--{name.replace('_', '-')} is for --task hidden (the context task trains n_loops = hops)"
        return None

    @staticmethod
    def lr_schedule() -> dict:
        """``TrainingArguments`` fields of the learning-rate schedule: cosine decay to 0.1x, not to 0."""
        return {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}}

    def training_set(self, tokenizer, args):
        """``--curriculum-steps`` batches of 1-hop prompts, then prompts with 1..K hops; each batch shares one hop
        count and graph size (read in order, see ``in_order``)."""
        import datasets

        hops = range(1, args.train_hops + 1)
        first = args.curriculum_steps * args.batch_size
        parts = [self.dataset(tokenizer, [1], first, seed=args.seed, group_size=args.batch_size)] if first else []
        if args.train_examples > first:
            parts.append(self.dataset(tokenizer, hops, args.train_examples - first, seed=args.seed + 1,
                                      group_size=args.batch_size))
        return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]

    def eval_questions(self, hops: int, args) -> list[tuple[str, str]]:
        """(question, answer) pairs scored at ``hops`` hops: ``--eval-examples`` seeded single-query prompts over
        fresh ``--num-nodes``-node graphs."""
        return [(row["question"], row["answer"]) for row in self.eval_examples(hops, args.eval_examples)]

    def sample_question(self, i: int, hops: int, args) -> tuple[str, str]:
        """The ``i``-th question the reloaded model answers after training, and its answer."""
        row = self.eval_examples(hops, 1, seed=f"sample-{args.seed}-{i}")[0]
        return row["question"], row["answer"]

    def introduction(self, args) -> str:
        example = self.eval_examples(2, 1, seed="intro")[0]
        return (f"Task: a new random cycle of up to {args.num_nodes} nodes in every prompt; '{example['question']}' "
                f"asks for the node 2 links after '{example['question'][-1]}' ({example['answer']!r}). Training on "
                f"1..{args.train_hops} hops ({args.curriculum_steps} 1-hop batches first), testing on "
                f"1..{args.eval_hops} over {args.num_nodes}-node graphs.")

    @staticmethod
    def scored(args) -> str:
        """What each accuracy is measured over, for the table's heading."""
        return f"{args.eval_examples} prompts per hop count"

    def describe(self, args, exit_rule: dict | None) -> dict:
        """What a saved model was trained on (its folder's ``demo_task.json``)."""
        return {"task": self.flag, "max_nodes": self.max_nodes, "seed": self.seed, "train_hops": args.train_hops,
                "eval_hops": args.eval_hops, "exit_rule": exit_rule}

    @staticmethod
    def plot_title(args) -> str:
        return f"in-context k-hop pointer chasing, a new {args.num_nodes}-node cycle in every prompt"


def random_cycle(nodes: Iterable[str], rng: random.Random) -> dict[str, str]:
    """Links one cycle through ``nodes`` in an order shuffled by ``rng``: node -> successor."""
    order = list(nodes)
    rng.shuffle(order)
    return {node: order[(i + 1) % len(order)] for i, node in enumerate(order)}


def follow(successor: dict[str, str], start: str, hops: int) -> str:
    """The node reached from ``start`` after ``hops`` links of ``successor``."""
    node = start
    for _ in range(_check_hops(hops)):
        node = successor[node]
    return node


def _hop_choices(hops: Iterable[int]) -> list[int]:
    choices = sorted({_check_hops(k) for k in hops})
    if not choices:
        raise ValueError("`hops` must name at least one hop count")
    return choices


def _check_hops(hops) -> int:
    if isinstance(hops, bool) or not isinstance(hops, int) or hops < 1:
        raise ValueError(f"hop counts must be positive integers, got {hops!r}")
    return hops


__all__ = ["PointerChasingTask", "InContextPointerChasingTask", "NODE_NAMES", "HOP_MARK"]
