"""MythosConfig: the reference defaults and presets; then the bad-input battery, where every class of bad value is
refused up front, naming the field.

Bad type -> TypeError, bad value -> ValueError; both messages name the field, show the value and say what is
accepted. The same checks run when a config arrives through ``from_dict`` or a saved ``config.json``.
"""

import copy
import json
import math
import re

import numpy as np
import pytest
from transformers import AutoConfig, GenerationConfig

from openmythos import PRESETS, MythosConfig, count_parameters, mythos_tiny
from openmythos.configuration_mythos import MYTHOS_FORMAT_VERSION

REFERENCE_DEFAULTS = dict(
    vocab_size=32000, dim=2048, n_heads=16, n_kv_heads=4, max_seq_len=4096, max_loop_iters=16, prelude_layers=2,
    coda_layers=2, attn_type="mla", kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
    v_head_dim=128, n_experts=64, n_shared_experts=2, n_experts_per_tok=4, expert_dim=512, act_threshold=0.99,
    rope_theta=5e5, lora_rank=16, dropout=0.0,
)


def test_defaults_equal_reference_defaults():
    config = MythosConfig()
    for name, value in REFERENCE_DEFAULTS.items():
        assert getattr(config, name) == value, name


def test_reference_config_dict_loads_unchanged():
    readme_mla = dict(vocab_size=1000, dim=256, n_heads=8, n_kv_heads=8, max_seq_len=128, max_loop_iters=4,
                      prelude_layers=1, coda_layers=1, n_experts=8, n_shared_experts=1, n_experts_per_tok=2,
                      expert_dim=64, lora_rank=8, attn_type="mla", kv_lora_rank=32, q_lora_rank=64,
                      qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
    config = MythosConfig(**readme_mla)
    assert all(getattr(config, k) == v for k, v in readme_mla.items())


def test_hf_aliases_read_and_write_reference_fields():
    config = MythosConfig(hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                          max_position_embeddings=256, attn_type="gqa")
    assert (config.dim, config.n_heads, config.n_kv_heads, config.max_seq_len) == (128, 8, 2, 256)
    assert config.hidden_size == 128 and config.num_attention_heads == 8
    assert config.num_key_value_heads == 2 and config.max_position_embeddings == 256
    assert config.dense_ffn_dim == 128 * 4 // 3


@pytest.mark.parametrize("alias, field", sorted(MythosConfig.attribute_map.items()))
def test_conflicting_alias_and_field_is_refused(alias, field):
    default = getattr(MythosConfig(), field)
    for given in (default, 2 * default):  # also when the field is given at its default value
        with pytest.raises(ValueError, match=f"`{alias}`.*`{field}`"):
            MythosConfig(**{field: given, alias: given // 2})
    assert getattr(MythosConfig(**{field: default * 2, alias: default * 2}), field) == default * 2  # agreeing is fine


def test_num_hidden_layers_counts_every_cache_slot():
    config = mythos_tiny(prelude_layers=2, coda_layers=3, max_loop_iters=5)
    assert config.num_hidden_layers == 2 + 3 + 5
    with pytest.raises(ValueError, match="num_hidden_layers"):
        config.num_hidden_layers = 4


def test_round_trip_through_dict_and_autoconfig(tmp_path):
    config = mythos_tiny(attn_type="gqa", use_act=True)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MythosConfig)
    drop = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert drop(loaded.to_dict()) == drop(config.to_dict())
    assert loaded.mythos_format_version == MYTHOS_FORMAT_VERSION


def test_newer_format_version_is_refused_with_upgrade_hint():
    with pytest.raises(ValueError, match="format version"):
        mythos_tiny(mythos_format_version=MYTHOS_FORMAT_VERSION + 1)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(attn_type="gqa", dim=66, n_heads=4), "dim"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(n_experts=4, n_experts_per_tok=5), "n_experts_per_tok"),
        (dict(attn_type="mha"), "attn_type"),
        (dict(dim=0), "dim"),
        (dict(n_heads=-2), "n_heads"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(max_loop_iters=0), "max_loop_iters"),
        (dict(expert_dim=0), "expert_dim"),
        (dict(prelude_layers=-1), "prelude_layers"),
        (dict(kv_lora_rank=0), "kv_lora_rank"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(act_threshold=0.0), "act_threshold"),
        (dict(act_threshold=1.5), "act_threshold"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_impossible_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        mythos_tiny(**overrides)


@pytest.mark.parametrize("overrides, field", [(dict(max_loop_iters=2.5), "max_loop_iters"),
                                              (dict(n_experts=True), "n_experts")])
def test_wrong_type_is_a_type_error_naming_the_field(overrides, field):
    # Full battery (every field, every class of bad input) in test_bad_config.py.
    with pytest.raises(TypeError, match=f"`{field}` must be an integer"):
        mythos_tiny(**overrides)


# Totals measured on the reference implementation (reference-facts.md), in billions.
REFERENCE_TOTALS = {"mythos_1b": 1.06, "mythos_3b": 3.04, "mythos_10b": 9.98, "mythos_50b": 50.4,
                    "mythos_100b": 99.6, "mythos_500b": 497.9, "mythos_1t": 999.3}


@pytest.mark.parametrize("name", sorted(REFERENCE_TOTALS))
def test_preset_parameter_counts_match_reference(name):
    counts = count_parameters(PRESETS[name]())
    assert counts.total / 1e9 == pytest.approx(REFERENCE_TOTALS[name], rel=0.01)
    assert 0 < counts.active < counts.total


def test_presets_follow_the_seed_table():
    seed_table = {  # dim, experts, expert_dim, loop iters, context
        "mythos_1b": (2048, 64, 2048, 16, 4096), "mythos_3b": (3072, 64, 4096, 16, 4096),
        "mythos_10b": (4096, 128, 5632, 24, 8192), "mythos_50b": (6144, 256, 9728, 32, 8192),
        "mythos_100b": (8192, 256, 13568, 32, 2**20), "mythos_500b": (12288, 512, 23040, 48, 2**20),
        "mythos_1t": (16384, 512, 34560, 64, 2**20),
    }
    for name, row in seed_table.items():
        c = PRESETS[name]()
        assert (c.dim, c.n_experts, c.expert_dim, c.max_loop_iters, c.max_seq_len) == row, name


def test_active_parameters_of_1b_match_reference():
    # reference-facts.md: mythos_1b has about 0.31B active parameters per token.
    assert count_parameters(PRESETS["mythos_1b"]()).active / 1e9 == pytest.approx(0.31, abs=0.01)


# ------------------------------------------------------------------------------------------------- bad configurations
FLOAT_FIELDS = ["act_threshold", "rope_theta", "dropout", "act_ponder_weight", "loop_signal_scale",
                "routed_scaling_factor", "mean_train_loops", "loop_sampling_sigma", "router_bias_update_rate",
                "router_aux_loss_coef", "rms_norm_eps", "initializer_range"]
INT_FIELDS = ["vocab_size", "dim", "n_heads", "n_kv_heads", "max_seq_len", "max_loop_iters", "prelude_layers",
              "coda_layers", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
              "n_experts", "n_shared_experts", "n_experts_per_tok", "expert_dim", "lora_rank", "dense_ffn_dim",
              "max_train_loops", "loop_sampling_seed", "max_inference_loops", "backprop_loops",
              "mythos_format_version", "chunk_size_feed_forward"]
BOOL_FIELDS = ["mla_absorb", "use_act", "loop_state_norm", "tie_word_embeddings", "use_cache", "output_hidden_states",
               "return_dict", "is_encoder_decoder"]
STR_FIELDS = {"attn_type": ("mla", "gqa"), "loop_sampling": ("fixed", "poisson_lognormal")}
TOKEN_FIELDS = ["pad_token_id", "bos_token_id", "eos_token_id"]


def names(field, value):
    """A pattern requiring the backticked field name and the repr of the bad value, in that order."""
    return rf"`{field}`.*{re.escape(repr(value))}"


class TestNonFiniteFloats:
    @pytest.mark.parametrize("field", FLOAT_FIELDS)
    @pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
    def test_infinite_or_nan_float_is_refused(self, field, value):
        with pytest.raises(ValueError, match=names(field, value)) as error:
            mythos_tiny(**{field: value})
        assert "finite" in str(error.value)

    def test_out_of_range_float_names_the_range(self):
        with pytest.raises(ValueError, match=names("rms_norm_eps", -1e-6)) as error:
            mythos_tiny(rms_norm_eps=-1e-6)
        assert "finite number > 0" in str(error.value)
        with pytest.raises(ValueError, match=names("dropout", 1.0)) as error:
            mythos_tiny(dropout=1.0)
        assert "in [0, 1)" in str(error.value)


class TestWrongTypes:
    @pytest.mark.parametrize("field", FLOAT_FIELDS)
    @pytest.mark.parametrize("value", ["0.5", True, [0.5]])
    def test_float_field_refuses_non_numbers(self, field, value):
        with pytest.raises(TypeError, match=names(field, value)) as error:
            mythos_tiny(**{field: value})
        assert "number" in str(error.value)

    def test_none_is_refused_where_the_field_is_not_optional(self):
        with pytest.raises(TypeError, match=names("rope_theta", None)):
            mythos_tiny(rope_theta=None)
        with pytest.raises(TypeError, match=names("n_experts", None)):
            mythos_tiny(n_experts=None)
        assert mythos_tiny(mean_train_loops=None, max_train_loops=None).mean_train_loops is None

    @pytest.mark.parametrize("field", INT_FIELDS)
    @pytest.mark.parametrize("value", ["4", 4.0, True, 2.5])
    def test_int_field_refuses_strings_floats_and_bools(self, field, value):
        with pytest.raises(TypeError, match=names(field, value)) as error:
            mythos_tiny(**{field: value})
        assert "integer" in str(error.value)

    @pytest.mark.parametrize("field", BOOL_FIELDS)
    @pytest.mark.parametrize("value", ["no", "False", 0, 1])
    def test_bool_field_refuses_truthy_stand_ins(self, field, value):
        with pytest.raises(TypeError, match=names(field, value)) as error:
            mythos_tiny(**{field: value})
        assert "True or False" in str(error.value)

    def test_use_act_no_does_not_turn_halting_on(self):
        with pytest.raises(TypeError, match="`use_act`"):
            mythos_tiny(use_act="no")

    @pytest.mark.parametrize("field, accepted", sorted(STR_FIELDS.items()))
    def test_str_field_refuses_other_types_and_unknown_values(self, field, accepted):
        for value in (1, None, ["mla"]):
            with pytest.raises(TypeError, match=names(field, value)):
                mythos_tiny(**{field: value})
        with pytest.raises(ValueError, match=names(field, "MLA")) as error:
            mythos_tiny(**{field: "MLA"})
        assert all(repr(choice) in str(error.value) for choice in accepted)


class TestTokenIds:
    @pytest.mark.parametrize("field", TOKEN_FIELDS)
    @pytest.mark.parametrize("value", [512, -1, 10**6])
    def test_token_id_outside_the_vocabulary_is_refused(self, field, value):
        with pytest.raises(ValueError, match=names(field, value)) as error:
            mythos_tiny(**{field: value})  # mythos_tiny has vocab_size=512
        assert "[0, 512)" in str(error.value)

    def test_eos_list_with_one_id_outside_the_vocabulary_is_refused(self):
        with pytest.raises(ValueError, match=names("eos_token_id", [3, 600])) as error:
            mythos_tiny(eos_token_id=[3, 600])
        assert "[0, 512)" in str(error.value)
        with pytest.raises(ValueError, match=r"`eos_token_id`.*non-empty.*\[\]"):
            mythos_tiny(eos_token_id=[])
        with pytest.raises(TypeError, match=names("eos_token_id", [1, "2"])) as error:
            mythos_tiny(eos_token_id=[1, "2"])
        assert "(element '2' is a str)" in str(error.value)

    @pytest.mark.parametrize("field", TOKEN_FIELDS)
    @pytest.mark.parametrize("value", ["2", 2.0, True])
    def test_token_id_of_the_wrong_type_is_refused(self, field, value):
        with pytest.raises(TypeError, match=names(field, value)):
            mythos_tiny(**{field: value})

    def test_valid_token_ids_are_kept_as_plain_ints(self):
        config = mythos_tiny(pad_token_id=0, bos_token_id=np.int64(1), eos_token_id=(np.int32(2), 511))
        assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, [2, 511])
        assert type(config.bos_token_id) is int and all(type(i) is int for i in config.eos_token_id)


class TestLoopBounds:
    def test_default_limit_is_eight_times_max_loop_iters(self):
        assert mythos_tiny(max_loop_iters=4).loop_limit == 32
        assert mythos_tiny(max_loop_iters=4, max_inference_loops=100).loop_limit == 100

    def test_huge_mean_train_loops_is_refused_naming_the_bound(self):
        with pytest.raises(ValueError, match=names("mean_train_loops", 1e12)) as error:
            mythos_tiny(loop_sampling="poisson_lognormal", mean_train_loops=1e12)
        assert "<= 32 (`max_inference_loops`" in str(error.value)  # the limit in force: 8 * max_loop_iters

    def test_raising_max_inference_loops_admits_a_larger_mean(self):
        config = mythos_tiny(loop_sampling="poisson_lognormal", mean_train_loops=100, max_inference_loops=128)
        assert config.mean_train_loops == 100 and config.loop_limit == 128

    def test_max_train_loops_above_the_limit_is_refused(self):
        with pytest.raises(ValueError, match=names("max_train_loops", 33)) as error:
            mythos_tiny(max_train_loops=33)
        assert "<= 32 (`max_inference_loops`" in str(error.value)
        assert mythos_tiny(max_train_loops=32).max_train_loops == 32

    def test_max_inference_loops_below_max_loop_iters_is_refused(self):
        with pytest.raises(ValueError, match=names("max_inference_loops", 3)) as error:
            mythos_tiny(max_loop_iters=4, max_inference_loops=3)
        assert ">= `max_loop_iters` (4" in str(error.value)
        assert mythos_tiny(max_loop_iters=4, max_inference_loops=4).loop_limit == 4

    @pytest.mark.parametrize("field", ["backprop_loops", "max_train_loops", "max_inference_loops"])
    def test_loop_counts_must_be_positive(self, field):
        with pytest.raises(ValueError, match=names(field, 0)):
            mythos_tiny(**{field: 0})

    def test_mean_train_loops_below_one_is_refused(self):
        with pytest.raises(ValueError, match=names("mean_train_loops", 0.5)):
            mythos_tiny(mean_train_loops=0.5)

    def test_seed_must_fit_the_generator(self):
        with pytest.raises(ValueError, match=names("loop_sampling_seed", -1)):
            mythos_tiny(loop_sampling_seed=-1)
        with pytest.raises(ValueError, match=names("loop_sampling_seed", 2**32)):
            mythos_tiny(loop_sampling_seed=2**32)


def saved_config(tmp_path, **changes):
    """Save a valid tiny config, then edit its config.json by hand (as a user or another tool might)."""
    mythos_tiny().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))  # json writes inf as Infinity, which json.loads reads back
    return tmp_path


class TestSavedConfigs:
    @pytest.mark.parametrize("changes, error, field", [
        (dict(rope_theta=math.inf), ValueError, "rope_theta"),
        (dict(use_act="no"), TypeError, "use_act"),
        (dict(eos_token_id=512), ValueError, "eos_token_id"),
        (dict(mean_train_loops=1e12), ValueError, "mean_train_loops"),
    ])
    def test_bad_value_in_config_json_is_refused(self, tmp_path, changes, error, field):
        folder = saved_config(tmp_path, **changes)
        for load in (MythosConfig.from_pretrained, AutoConfig.from_pretrained,
                     lambda f: MythosConfig.from_json_file(f / "config.json"),
                     lambda f: MythosConfig.from_dict(json.loads((f / "config.json").read_text()))):
            with pytest.raises(error, match=f"`{field}`"):
                load(folder)

    def test_bad_override_at_load_time_is_refused(self, tmp_path):
        folder = saved_config(tmp_path)
        with pytest.raises(TypeError, match=names("use_act", "no")):
            MythosConfig.from_pretrained(folder, use_act="no")
        with pytest.raises(ValueError, match="`rope_theta`"):
            AutoConfig.from_pretrained(folder, rope_theta=math.nan)
        config, unused = MythosConfig.from_pretrained(folder, use_act=True, return_unused_kwargs=True)
        assert config.use_act is True and unused == {}


class TestGoodInputStillWorks:
    def test_defaults_and_every_preset_validate(self):
        assert MythosConfig().loop_limit == 8 * 16
        for name, preset in PRESETS.items():
            config = preset()
            assert config.loop_limit == 8 * config.max_loop_iters, name

    def test_numpy_numbers_are_accepted_and_stored_as_python_numbers(self, tmp_path):
        config = mythos_tiny(dim=np.int64(64), max_loop_iters=np.int32(4), rope_theta=np.float32(10000.0),
                             dropout=np.float64(0.1))
        assert (config.dim, config.max_loop_iters, config.rope_theta, config.dropout) == (64, 4, 10000.0, 0.1)
        assert type(config.dim) is int and type(config.rope_theta) is float
        config.save_pretrained(tmp_path)  # json.dumps would fail on numpy scalars
        assert MythosConfig.from_pretrained(tmp_path).dim == 64

    def test_int_for_a_float_field_and_json_floats_are_accepted(self, tmp_path):
        config = mythos_tiny(rope_theta=10000, act_threshold=1, mean_train_loops=3)
        assert config.rope_theta == 10000 and config.mean_train_loops == 3
        folder = saved_config(tmp_path, rope_theta=10000.0, initializer_range=0.02)
        assert MythosConfig.from_pretrained(folder).rope_theta == 10000.0

    def test_transformers_config_paths_keep_working(self, tmp_path):
        config = mythos_tiny(attn_type="gqa", use_act=True, eos_token_id=[1, 2], pad_token_id=0,
                             max_inference_loops=40, backprop_loops=2)
        rebuilt = MythosConfig.from_dict(config.to_dict())
        assert rebuilt.to_dict() == config.to_dict()
        assert copy.deepcopy(config).to_dict() == config.to_dict()
        config.save_pretrained(tmp_path)
        loaded = AutoConfig.from_pretrained(tmp_path)
        assert (loaded.eos_token_id, loaded.loop_limit, loaded.backprop_loops) == ([1, 2], 40, 2)
        generation = GenerationConfig.from_model_config(loaded)
        assert generation.eos_token_id == [1, 2] and generation.pad_token_id == 0
