"""MythosTokenizer: the offline byte-level default, and loading any other tokenizer through AutoTokenizer."""

import json

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoTokenizer

import openmythos  # noqa: F401  (registers MythosTokenizer with AutoTokenizer)
from openmythos import mythos_tiny
from openmythos.tokenization_mythos import MythosTokenizer

PAD, BOS, EOS, UNK, OFFSET = 0, 1, 2, 3, 4

TRICKY_STRINGS = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "spaces before punctuation . , ! ? ' s n't",
    "line one\nline two\r\nthree\ttabbed\n\n",
    "NUL \x00 DEL \x7f C1 \x80\x9f",
    "naïve café résumé",
    "e\u0301 vs \u00e9, a\u0308\u0323 stacked combining marks",
    "\u1100\u1161\u11a8 decomposed Hangul, 한국어 composed",
    "日本語のテキスト、中文文本。",
    "שלום مرحبا (right to left)",
    "नमस्ते ภาษาไทย",
    "emoji 😀, family 👩\u200d👩\u200d👧\u200d👦, skin tone 👋🏽, flag 🇯🇵, keycap 1\ufe0f\u20e3",
    "astral 𝕳𝖊𝖑𝖑𝖔 \U0010ffff",
    "zero width \u200b joiner \u200d BOM \ufeff",
    "<0x41> looks like a byte token but is text",
]


@pytest.fixture
def tok():
    return MythosTokenizer()


def byte_ids(text: str) -> list[int]:
    return [b + OFFSET for b in text.encode("utf-8")]


def test_special_token_ids_and_vocab_size(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (PAD, BOS, EOS, UNK)
    assert tok.vocab_size == len(tok) == 260
    assert sorted(tok.get_vocab().values()) == list(range(260))
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4, 4 + 0x41, 259]) == [
        "<pad>", "<bos>", "<eos>", "<unk>", "<0x00>", "<0x41>", "<0xFF>"]
    assert tok.convert_tokens_to_ids(["<0x41>", "<eos>", "not-a-token"]) == [4 + 0x41, EOS, UNK]


def test_encoding_adds_no_special_tokens_by_default(tok):
    assert tok("ab")["input_ids"] == [OFFSET + 97, OFFSET + 98]
    assert tok("ab", add_special_tokens=False)["input_ids"] == tok("ab")["input_ids"]
    assert tok("ab")["attention_mask"] == [1, 1]
    assert "token_type_ids" not in tok("ab")


@pytest.mark.parametrize(("options", "expected"), [
    (dict(append_eos=True), [101, 102, EOS]),
    (dict(prepend_bos=True), [BOS, 101, 102]),
    (dict(prepend_bos=True, append_eos=True), [BOS, 101, 102, EOS]),
])
def test_prepend_bos_and_append_eos_options(options, expected):
    tok = MythosTokenizer(**options)
    assert tok("ab")["input_ids"] == expected
    assert tok("ab", add_special_tokens=False)["input_ids"] == [101, 102]
    assert tok.decode(expected, skip_special_tokens=True) == "ab"


def test_append_eos_can_be_switched_after_construction(tok):
    tok.append_eos = True
    assert tok("ab")["input_ids"] == [101, 102, EOS]
    assert tok.get_special_tokens_mask([101, 102]) == [0, 0, 1]


@pytest.mark.parametrize("text", TRICKY_STRINGS)
def test_unicode_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert ids == byte_ids(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_tokens_to_string(tok.tokenize(text)) == text


def test_batch_decode_round_trips_every_string(tok):
    batch = tok(TRICKY_STRINGS, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (len(TRICKY_STRINGS), max(len(s.encode("utf-8")) for s in TRICKY_STRINGS))
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == TRICKY_STRINGS


def test_decode_replaces_invalid_bytes_instead_of_raising(tok):
    euro = byte_ids("€")  # three bytes
    assert tok.decode(euro[:2]) == "\ufffd"  # generation stopped inside a character
    assert tok.decode(byte_ids("a") + [OFFSET + 0xFF] + byte_ids("b")) == "a\ufffdb"
    assert tok.decode([OFFSET + 0x80]) == "\ufffd"  # lone continuation byte
    assert tok.decode(euro[:2] + [EOS] + euro) == "\ufffd<eos>€"
    assert tok.decode([]) == ""


def test_ids_outside_the_vocabulary_decode_as_unk(tok):
    # A model whose embedding is padded past 260 rows can emit these.
    assert tok.decode(byte_ids("a") + [260, 9999]) == "a<unk><unk>"


def test_lone_surrogate_encodes_as_one_replacement_character(tok):
    ids = tok("a\ud83db")["input_ids"]
    assert ids == byte_ids("a\ufffdb")
    assert tok.decode(ids) == "a\ufffdb"


LITERAL = "see <eos>, <pad> and <bos> in the HTML"


def test_special_token_text_in_input_stays_text_by_default(tok):
    # Web text that mentions `<eos>` must not insert a document boundary.
    assert tok("a<eos>b")["input_ids"] == byte_ids("a<eos>b")
    assert tok("a<eos>b", add_special_tokens=False)["input_ids"] == byte_ids("a<eos>b")
    assert tok(LITERAL)["input_ids"] == byte_ids(LITERAL)
    assert tok.tokenize("<unk>") == ["<0x3C>", "<0x75>", "<0x6E>", "<0x6B>", "<0x3E>"]
    assert tok.encode("<eos>") == byte_ids("<eos>")


def test_special_token_text_is_parsed_when_the_caller_asks():
    assert MythosTokenizer()("a<eos>b", split_special_tokens=False)["input_ids"] == [OFFSET + 97, EOS, OFFSET + 98]
    parsing = MythosTokenizer(split_special_tokens=False)
    assert parsing("a<eos>b<pad>")["input_ids"] == [OFFSET + 97, EOS, OFFSET + 98, PAD]
    assert parsing("a<eos>b", split_special_tokens=True)["input_ids"] == byte_ids("a<eos>b")
    assert parsing.decode([OFFSET + 97, EOS, OFFSET + 98]) == "a<eos>b"


def test_skip_special_tokens_keeps_literal_text_and_drops_real_special_ids():
    tok = MythosTokenizer(prepend_bos=True, append_eos=True)
    ids = tok(LITERAL)["input_ids"]
    assert ids == [BOS] + byte_ids(LITERAL) + [EOS]  # add_special_tokens=True still adds the real ids
    assert tok.decode(ids, skip_special_tokens=True) == LITERAL
    assert tok.decode(ids) == "<bos>" + LITERAL + "<eos>"
    assert tok.batch_decode([ids, [PAD] + ids], skip_special_tokens=True) == [LITERAL, LITERAL]


def test_added_special_tokens_stay_text_but_added_plain_tokens_still_match(tok):
    tok.add_special_tokens({"extra_special_tokens": ["<|end|>"]})
    tok.add_tokens(["<|user|>"])
    end, user = tok.convert_tokens_to_ids(["<|end|>", "<|user|>"])
    text = "<|user|>hi<|end|>"
    assert tok(text)["input_ids"] == [user] + byte_ids("hi<|end|>")
    assert tok(text, split_special_tokens=False)["input_ids"] == [user] + byte_ids("hi") + [end]
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_added_token_strip_and_single_word_rules_match_the_parsing_path(tok):
    from transformers import AddedToken

    tok.add_tokens([AddedToken("<r>", lstrip=True, rstrip=True), AddedToken("cat", single_word=True)])
    for text in ["a <r>  b", "a cat b", "concatenate", "cat <r> cat"]:
        assert tok(text)["input_ids"] == tok(text, split_special_tokens=False)["input_ids"]
    assert tok.tokenize("a <r>  b") == ["<0x61>", "<r>", "<0x62>"]
    assert tok("a cat b")["input_ids"] == byte_ids("a ") + [tok.convert_tokens_to_ids("cat")] + byte_ids(" b")
    assert tok("concatenate")["input_ids"] == byte_ids("concatenate")


def test_split_special_tokens_survives_save_and_load(tmp_path):
    for value in (True, False, None):  # None: the default, which is True
        folder = tmp_path / str(value)
        (MythosTokenizer() if value is None else MythosTokenizer(split_special_tokens=value)).save_pretrained(folder)
        value = True if value is None else value
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["split_special_tokens"] is value
        expected = byte_ids("a<eos>") if value else byte_ids("a") + [EOS]
        for loaded in (MythosTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)):
            assert type(loaded) is MythosTokenizer and loaded.split_special_tokens is value
            assert loaded("a<eos>")["input_ids"] == expected


def test_split_special_tokens_set_after_construction_is_saved(tmp_path):
    tok = MythosTokenizer()
    tok.split_special_tokens = False
    tok.save_pretrained(tmp_path)
    assert MythosTokenizer.from_pretrained(tmp_path)("<eos>")["input_ids"] == [EOS]


def test_remote_code_tokenizer_keeps_literal_special_text(tmp_path):
    # The Hub-export path: tokenization_mythos.py loaded as remote code where openmythos is not installed.
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import openmythos.tokenization_mythos as module

    folder = tmp_path / "tok"
    MythosTokenizer().save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_mythos.MythosTokenizer", None]}
    config_path.write_text(json.dumps(config))
    shutil.copy(module.__file__, folder / "tokenization_mythos.py")
    root = str(Path(module.__file__).resolve().parents[1])
    code = f"""
import sys
sys.modules["openmythos"] = None
sys.path = [p for p in sys.path if p not in ("", {root!r})]
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
assert type(tok).__module__.startswith("transformers_modules"), type(tok).__module__
print(tok("a<eos>b")["input_ids"], tok("a<eos>b", split_special_tokens=False)["input_ids"])
"""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == f"{byte_ids('a<eos>b')} {[OFFSET + 97, EOS, OFFSET + 98]}"


def test_chat_template_markup_is_parsed_and_sanitized_messages_stay_text(tok):
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}"
    chat = [{"role": "user", "content": "a<eos>"}]
    assert tok.apply_chat_template(chat)["input_ids"] == [OFFSET + 97, EOS, EOS]
    assert tok.apply_chat_template(chat, sanitize_control_tokens=True)["input_ids"] == byte_ids("a<eos>") + [EOS]
    assert tok.split_special_tokens is True  # restored after the template is applied
    assert tok("<eos>")["input_ids"] == byte_ids("<eos>")


@pytest.mark.parametrize("where", ["call", "init"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_padding_with_attention_mask(side, where):
    tok = MythosTokenizer(padding_side=side) if where == "init" else MythosTokenizer()
    kwargs = dict(padding_side=side) if where == "call" else {}
    batch = tok(["a", "abc", "é"], padding=True, return_tensors="pt", **kwargs)
    a, b, c, e1, e2 = OFFSET + 97, OFFSET + 98, OFFSET + 99, OFFSET + 0xC3, OFFSET + 0xA9
    if side == "right":
        ids = [[a, PAD, PAD], [a, b, c], [e1, e2, PAD]]
        mask = [[1, 0, 0], [1, 1, 1], [1, 1, 0]]
    else:
        ids = [[PAD, PAD, a], [a, b, c], [PAD, e1, e2]]
        mask = [[0, 0, 1], [1, 1, 1], [0, 1, 1]]
    assert torch.equal(batch["input_ids"], torch.tensor(ids))
    assert torch.equal(batch["attention_mask"], torch.tensor(mask))
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["a", "abc", "é"]
    padded = tok.batch_decode(batch["input_ids"])[0]
    assert padded == ("a<pad><pad>" if side == "right" else "<pad><pad>a")


def test_padding_to_max_length_and_truncation(tok):
    batch = tok(["abcdef", "a"], padding="max_length", truncation=True, max_length=4)
    assert batch["input_ids"] == [byte_ids("abcd"), byte_ids("a") + [PAD] * 3]
    assert batch["attention_mask"] == [[1, 1, 1, 1], [1, 0, 0, 0]]


def test_added_tokens_get_new_ids_and_do_not_collide_with_bytes(tok):
    assert tok.add_tokens(["<|user|>", "é"]) == 2
    assert len(tok) == 262
    ids = tok("é中<|user|>")["input_ids"]
    assert ids == [261] + byte_ids("中") + [260]
    assert tok.decode(ids) == "é中<|user|>"
    assert tok.decode(byte_ids("é")) == "é"  # the bytes of é still decode as bytes


def test_save_and_load_round_trip_gives_identical_ids(tmp_path):
    tok = MythosTokenizer(append_eos=True, padding_side="left")
    tok.add_tokens(["<|user|>"])
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "MythosTokenizer"
    assert config["append_eos"] is True and config["prepend_bos"] is False

    loaded = MythosTokenizer.from_pretrained(tmp_path)
    texts = TRICKY_STRINGS + ["a<|user|>b<eos>"]
    assert [loaded(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    assert loaded.padding_side == "left" and len(loaded) == 261


# The two tests below need `AutoTokenizer.register(MythosConfig, tokenizer_class=MythosTokenizer)`,
# which `import openmythos` runs.
def test_auto_tokenizer_loads_a_saved_tokenizer_folder(tmp_path):
    MythosTokenizer(append_eos=True).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is MythosTokenizer
    assert loaded("hé")["input_ids"] == byte_ids("hé") + [EOS]


def test_auto_tokenizer_loads_a_model_folder(tmp_path):
    tok = MythosTokenizer()
    mythos_tiny(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).save_pretrained(
        tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is MythosTokenizer
    assert loaded("日本")["input_ids"] == byte_ids("日本")
    assert MythosTokenizer.from_pretrained_or_default(str(tmp_path))("日本")["input_ids"] == byte_ids("日本")


def test_a_model_folder_with_a_subword_tokenizer_loads_that_tokenizer(tmp_path):
    # A checkpoint trained with another tokenizer (gpt-oss, say) must not come back as the byte tokenizer.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    mythos_tiny(vocab_size=3).save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), MythosTokenizer.from_pretrained_or_default(tmp_path)):
        assert not isinstance(loaded, MythosTokenizer)
        assert loaded("hello world")["input_ids"] == [1, 2]


def test_from_pretrained_or_default_without_a_name_is_the_byte_tokenizer():
    tok = MythosTokenizer.from_pretrained_or_default()
    assert type(tok) is MythosTokenizer and len(tok) == 260


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import; make the running process offline too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_offline_hub_name_raises_an_error_that_says_what_to_do(offline):
    name = "nonexistent-org/nonexistent-model"
    with pytest.raises(OSError) as info:
        MythosTokenizer.from_pretrained_or_default(name)
    message = str(info.value)
    assert f"could not load the tokenizer '{name}'" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert f"hf download {name}" in message
    assert "fallback=True" in message and "MythosTokenizer()" in message


def test_offline_hub_name_with_fallback_warns_and_returns_the_byte_tokenizer(offline, caplog):
    with caplog.at_level("WARNING", logger="openmythos.tokenization_mythos"):
        tok = MythosTokenizer.from_pretrained_or_default("nonexistent-org/nonexistent-model", fallback=True)
    assert type(tok) is MythosTokenizer and len(tok) == 260
    assert "Falling back to the byte-level MythosTokenizer" in caplog.text
    assert "nonexistent-org/nonexistent-model" in caplog.text


def test_missing_local_folder_error_names_the_folder(offline, tmp_path):
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(OSError, match="no tokenizer could be read from the folder"):
        MythosTokenizer.from_pretrained_or_default(str(missing))
