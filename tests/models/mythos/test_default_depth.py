"""``config.n_loops``: the default inference depth, separate from every parameter shape, and the loop controls a
generation config carries (how a server or an evaluation harness chooses a request's depth)."""

import json

import pytest
import torch
from conftest import make_model
from transformers import AutoModelForCausalLM, GenerationConfig

from openmythos import MythosLoopRecorder, mythos_tiny


def _names(field, value):
    return rf"`{field}`.*{value}"


def _token_loops(model, input_ids, **kwargs):
    recorder = MythosLoopRecorder()
    tokens = model.generate(input_ids, max_new_tokens=3, do_sample=False, loop_recorder=recorder, **kwargs)
    return tokens, recorder.token_loops()


class TestConfigField:
    def test_unset_means_max_loop_iters(self):
        config = mythos_tiny(max_loop_iters=4)
        assert config.n_loops is None and config.default_n_loops == 4
        assert mythos_tiny(max_loop_iters=4, n_loops=9).default_n_loops == 9

    @pytest.mark.parametrize("bad", [0, -2, 2.5, True, "8"])
    def test_bad_values_are_refused_naming_the_field(self, bad):
        with pytest.raises((ValueError, TypeError), match="n_loops"):
            mythos_tiny(n_loops=bad)

    def test_above_the_loop_limit_is_refused_naming_the_bound(self):
        with pytest.raises(ValueError, match=_names("n_loops", 33)) as error:
            mythos_tiny(max_loop_iters=4, n_loops=33)
        assert "<= 32 (`max_inference_loops`" in str(error.value)
        assert mythos_tiny(max_loop_iters=4, n_loops=33, max_inference_loops=40).default_n_loops == 33


class TestFromPretrained:
    def test_n_loops_changes_the_default_depth_and_no_shape(self, attn_type, input_ids, tmp_path):
        model = make_model(attn_type)
        model.save_pretrained(tmp_path)
        assert "n_loops" not in json.loads((tmp_path / "config.json").read_text()) or \
            json.loads((tmp_path / "config.json").read_text())["n_loops"] is None
        shallow = AutoModelForCausalLM.from_pretrained(tmp_path, n_loops=2).eval()
        assert shallow.config.n_loops == 2 and shallow.config.max_loop_iters == model.config.max_loop_iters
        for name, tensor in model.state_dict().items():
            assert torch.equal(shallow.state_dict()[name], tensor), name
        with torch.no_grad():
            out = shallow(input_ids)
            torch.testing.assert_close(out.logits, model(input_ids, n_loops=2).logits, atol=1e-6, rtol=0)
        assert out.loops_used.eq(2).all()
        tokens, loops = _token_loops(shallow, input_ids)
        assert loops.eq(2).all()
        assert torch.equal(tokens, model.generate(input_ids, max_new_tokens=3, do_sample=False, n_loops=2))
        # a call's own budget still wins
        _, loops = _token_loops(shallow, input_ids, n_loops=3)
        assert loops.eq(3).all()

    def test_the_field_is_saved_with_the_checkpoint(self, tmp_path, input_ids):
        model = make_model("gqa", n_loops=2)
        model.save_pretrained(tmp_path)
        assert json.loads((tmp_path / "config.json").read_text())["n_loops"] == 2
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert loaded.config.default_n_loops == 2
        with torch.no_grad():
            assert loaded(input_ids).loops_used.eq(2).all()

    def test_a_checkpoint_without_the_field_loads_as_before(self, tmp_path, input_ids):
        model = make_model("mla")
        model.save_pretrained(tmp_path)
        config = json.loads((tmp_path / "config.json").read_text())
        config.pop("n_loops", None)
        (tmp_path / "config.json").write_text(json.dumps(config))
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert loaded.config.n_loops is None and loaded.config.default_n_loops == model.config.max_loop_iters
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=1e-6, rtol=0)

    @pytest.mark.parametrize("bad", [0, 10**6])
    def test_a_bad_load_time_value_is_refused(self, tmp_path, bad):
        make_model("gqa").save_pretrained(tmp_path)
        with pytest.raises(ValueError, match=_names("n_loops", bad)):
            AutoModelForCausalLM.from_pretrained(tmp_path, n_loops=bad)


class TestGenerationConfig:
    def test_generation_config_chooses_the_depth(self, attn_type, input_ids):
        model = make_model(attn_type)
        config = GenerationConfig(max_new_tokens=3, do_sample=False, n_loops=2)
        recorder = MythosLoopRecorder()
        tokens = model.generate(input_ids, generation_config=config, loop_recorder=recorder)
        assert recorder.token_loops().eq(2).all()
        assert torch.equal(tokens, model.generate(input_ids, max_new_tokens=3, do_sample=False, n_loops=2))
        assert config.n_loops == 2  # the caller's config is not modified

    def test_precedence_call_then_generation_config_then_model_config(self, input_ids):
        model = make_model("gqa", n_loops=3)
        assert _token_loops(model, input_ids)[1].eq(3).all()
        model.generation_config.n_loops = 2
        assert _token_loops(model, input_ids)[1].eq(2).all()
        assert _token_loops(model, input_ids, n_loops=1)[1].eq(1).all()
        recorder = MythosLoopRecorder()
        model.generate(input_ids, generation_config=GenerationConfig(max_new_tokens=2, n_loops=4),
                       loop_recorder=recorder)
        assert recorder.token_loops().eq(4).all()

    def test_exit_criterion_from_the_generation_config(self, input_ids):
        model = make_model("mla")
        config = GenerationConfig(max_new_tokens=3, do_sample=False, n_loops=6, exit_criterion="delta",
                                  exit_threshold=0.5)
        recorder = MythosLoopRecorder()
        tokens = model.generate(input_ids, generation_config=config, loop_recorder=recorder)
        direct = MythosLoopRecorder()
        expected = model.generate(input_ids, max_new_tokens=3, do_sample=False, n_loops=6, exit_criterion="delta",
                                  exit_threshold=0.5, loop_recorder=direct)
        assert torch.equal(tokens, expected)
        assert torch.equal(recorder.token_loops(), direct.token_loops())
        assert recorder.token_loops().lt(6).any()  # the criterion stopped something early

    def test_a_bad_generation_config_budget_is_refused_before_any_step(self, input_ids):
        model = make_model("gqa")
        with pytest.raises(ValueError, match="n_loops"):
            model.generate(input_ids, generation_config=GenerationConfig(max_new_tokens=2, n_loops=0))

    def test_per_row_budgets_from_the_generation_config_follow_the_beams(self, input_ids):
        model = make_model("gqa")
        config = GenerationConfig(max_new_tokens=2, num_beams=2, do_sample=False, n_loops=[1, 3])
        tokens = model.generate(input_ids, generation_config=config)
        for row, budget in enumerate([1, 3]):
            alone = model.generate(input_ids[row:row + 1], max_new_tokens=2, num_beams=2, do_sample=False,
                                   n_loops=budget)
            assert torch.equal(tokens[row:row + 1], alone)
