import pytest
from transformers import AutoConfig

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
