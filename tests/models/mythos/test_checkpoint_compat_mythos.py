"""Checkpoints written by earlier code keep loading with the same logits.

``fixtures/pre_structure_{mla,gqa}`` (beside this file) were saved by the code before the structure refactor
(issue 10), together with the logits and greedy tokens they produced then (``expected.json``). MLA has halting on,
GQA off.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["pre_structure_mla", "pre_structure_gqa"])
def test_checkpoint_saved_before_the_refactor_gives_the_same_logits(name):
    folder = FIXTURES / name
    expected = json.loads((folder / "expected.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor(expected["input_ids"])
    with torch.no_grad():
        for n_loops in (1, 3, 5):
            logits = model(ids, n_loops=n_loops).logits
            torch.testing.assert_close(logits, torch.tensor(expected[f"logits_n_loops_{n_loops}"]), atol=1e-6, rtol=0)
    tokens = model.generate(ids[:1], max_new_tokens=5, do_sample=False, n_loops=3)
    assert tokens.tolist() == expected["greedy_n_loops_3"]
    assert model.spectral_radius() == pytest.approx(expected["spectral_radius"], abs=1e-7)
