"""Synthetic multi-hop reasoning: k-hop pointer chasing over a hidden random graph.

A seeded random permutation links every node (a letter) to its successor, forming one cycle through all nodes, so
``follow(x, k)`` differs for every k below the number of nodes: a model that stops one hop early or late is wrong.
The links are never shown: a question is the start node preceded by one ``+`` per hop (``"+++q"`` asks for the node
three links after ``q``), so answering needs exactly k composed lookups of facts the model has to learn. Writing the
hop count in unary keeps every token of a deeper question one that training has seen.

A looped model can learn one lookup per loop iteration and answer deeper questions by looping more; a model of fixed
depth has to spend layers per hop and runs out (``openmythos.demo`` measures both).
"""

import random
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

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
        order = list(self.nodes)
        random.Random(self.seed).shuffle(order)
        return {node: order[(i + 1) % len(order)] for i, node in enumerate(order)}

    def follow(self, start: str, hops: int) -> str:
        """The node reached from ``start`` after ``hops`` links."""
        node = start
        for _ in range(_check_hops(hops)):
            node = self.successor[node]
        return node

    @staticmethod
    def question(start: str, hops: int) -> str:
        return HOP_MARK * _check_hops(hops) + start

    def examples(self, hops: Iterable[int], num_examples: int, seed: int = 0) -> list[dict]:
        """``num_examples`` questions with start nodes and hop counts drawn uniformly (seeded) from ``hops``."""
        hop_choices = sorted({_check_hops(k) for k in hops})
        if not hop_choices:
            raise ValueError("`hops` must name at least one hop count")
        rng = random.Random(seed)
        rows = []
        for _ in range(num_examples):
            start, k = rng.choice(self.nodes), rng.choice(hop_choices)
            rows.append({"question": self.question(start, k), "answer": self.follow(start, k), "hops": k})
        return rows

    def dataset(self, tokenizer, hops: Iterable[int], num_examples: int, seed: int = 0):
        """A ``datasets.Dataset`` of tokenized questions for causal-LM training.

        Each row holds ``input_ids`` (question, answer, eos), ``labels`` (-100 on the question: only the answer and
        the eos after it are learned), ``hops``, ``question`` and ``answer``.
        """
        import datasets

        rows = self.examples(hops, num_examples, seed)
        for row in rows:
            question = tokenizer.encode(row["question"], add_special_tokens=False)
            answer = tokenizer.encode(row["answer"], add_special_tokens=False) + [tokenizer.eos_token_id]
            row["input_ids"] = question + answer
            row["labels"] = [-100] * len(question) + answer
        return datasets.Dataset.from_list(rows)


def _check_hops(hops) -> int:
    if isinstance(hops, bool) or not isinstance(hops, int) or hops < 1:
        raise ValueError(f"hop counts must be positive integers, got {hops!r}")
    return hops


__all__ = ["PointerChasingTask", "NODE_NAMES", "HOP_MARK"]
