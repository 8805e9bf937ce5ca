import pytest

from openmythos.training.data import SAMPLE_CORPUS, causal_lm_collator, pack_documents, pretraining_dataset
from openmythos.tokenization_mythos import MythosTokenizer


def test_packing_puts_eos_between_documents_and_loses_no_token():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    eos = 0
    blocks = list(pack_documents(docs, seq_len=4, eos_token_id=eos))
    stream = [t for block in blocks for t in block]
    expected = [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 0, 11, 0]
    assert all(len(b) == 4 for b in blocks)
    assert stream == expected[:len(stream)]
    assert len(expected) - len(stream) < 4  # only the final remainder is dropped
    assert stream.count(eos) == 2  # the third EOS falls in the dropped remainder [0, 11, 0]


def test_packing_random_documents_keeps_every_token_in_order():
    import random

    rng = random.Random(0)
    docs = [[rng.randrange(1, 100) for _ in range(rng.randrange(0, 50))] for _ in range(200)]
    blocks = list(pack_documents(docs, seq_len=37, eos_token_id=0))
    flat = [t for d in docs for t in d + [0]]
    stream = [t for b in blocks for t in b]
    assert stream == flat[:len(stream)] and len(flat) - len(stream) < 37


@pytest.mark.parametrize("streaming", [False, True])
def test_local_text_becomes_packed_blocks(streaming):
    tokenizer = MythosTokenizer()
    data = pretraining_dataset(tokenizer, 64, max_seq_len=128, data_files=[str(SAMPLE_CORPUS)], streaming=streaming)
    blocks = [row["input_ids"] for row in data]
    assert all(len(b) == 64 for b in blocks)
    text = SAMPLE_CORPUS.read_text()
    documents = [p for p in text.split("\n\n") if p.strip()]
    n_tokens = sum(len(tokenizer(d.strip("\n"), add_special_tokens=False)["input_ids"]) + 1 for d in documents)
    assert len(blocks) == n_tokens // 64
    stream = [t for b in blocks for t in b]
    assert stream.count(tokenizer.eos_token_id) in (len(documents), len(documents) - 1)
    assert tokenizer.decode(stream[:40]) == documents[0][:40]


def test_collator_labels_are_the_inputs():
    batch = causal_lm_collator([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]] and batch["labels"].tolist() == [[1, 2, 3], [4, 5, 6]]


class TestBadTrainingData:
    def test_missing_text_column(self, tmp_path):
        path = tmp_path / "data.jsonl"
        path.write_text('{"body": "hello world"}\n{"body": "more text"}\n')
        with pytest.raises(ValueError, match="no text column 'text'.*body"):
            pretraining_dataset(MythosTokenizer(), 8, data_files=[str(path)], streaming=False)

    def test_sequence_longer_than_the_model_allows(self):
        with pytest.raises(ValueError, match="max_seq_len=128"):
            pretraining_dataset(MythosTokenizer(), 256, max_seq_len=128, data_files=[str(SAMPLE_CORPUS)])

    def test_empty_dataset(self, tmp_path):
        path = tmp_path / "empty.txt"
        path.write_text("\n\n")
        with pytest.raises(ValueError, match="empty"):
            pretraining_dataset(MythosTokenizer(), 8, data_files=[str(path)], streaming=False)

    def test_missing_file_and_mixed_extensions(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            pretraining_dataset(MythosTokenizer(), 8, data_files=[str(tmp_path / "nope.txt")])
        (tmp_path / "a.txt").write_text("x")
        (tmp_path / "b.csv").write_text("text\nx\n")
        with pytest.raises(ValueError, match="extension"):
            pretraining_dataset(MythosTokenizer(), 8, data_files=[str(tmp_path / "a.txt"), str(tmp_path / "b.csv")])


# Web text that talks about special tokens, one document per paragraph.
LITERAL_DOCUMENTS = [
    "HTML tokenizers print <eos> at the end of a document.",
    "Padding shows up as <pad><pad><pad> in the logs, and <bos> starts a prompt.",
    "Nothing special here, just text: 日本語 and café.",
    "Ends with the marker <eos>",
]


def write_paragraphs(path, documents):
    path.write_text("\n\n".join(documents))  # no final newline: `datasets` keeps it in the last paragraph
    return path


def byte_length(document):
    return len(document.encode("utf-8"))


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("split_special_tokens", [True, False])  # the tokenizer's own setting must not matter
def test_literal_eos_text_in_pretraining_data_stays_text(tmp_path, streaming, split_special_tokens):
    tokenizer = MythosTokenizer(split_special_tokens=split_special_tokens)
    path = write_paragraphs(tmp_path / "web.txt", LITERAL_DOCUMENTS)
    total = sum(byte_length(d) + 1 for d in LITERAL_DOCUMENTS)  # every document and its EOS fill exactly one block
    data = pretraining_dataset(tokenizer, total, data_files=[str(path)], streaming=streaming)
    blocks = [row["input_ids"] for row in data]
    assert len(blocks) == 1
    eos = tokenizer.eos_token_id
    expected = [i for d in LITERAL_DOCUMENTS for i in [b + 4 for b in d.encode("utf-8")] + [eos]]
    assert blocks[0] == expected
    assert blocks[0].count(eos) == len(LITERAL_DOCUMENTS)  # exactly one per document boundary
    boundaries = [i for i, t in enumerate(blocks[0]) if t == eos]
    assert boundaries == [sum(byte_length(d) + 1 for d in LITERAL_DOCUMENTS[:n + 1]) - 1
                          for n in range(len(LITERAL_DOCUMENTS))]
    assert tokenizer.decode(blocks[0], skip_special_tokens=True) == "".join(LITERAL_DOCUMENTS)
    starts = [0] + [end + 1 for end in boundaries[:-1]]
    assert [tokenizer.decode(blocks[0][s:e]) for s, e in zip(starts, boundaries)] == LITERAL_DOCUMENTS


def test_literal_eos_text_stays_text_with_a_hugging_face_fast_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "hello": 2, "<": 3, "eos": 4, ">": 5}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<eos>")
    assert tokenizer("hello <eos>", add_special_tokens=False)["input_ids"] == [2, 1]  # it parses by default
    path = write_paragraphs(tmp_path / "web.txt", ["hello <eos> hello", "hello", "<eos>"])
    data = pretraining_dataset(tokenizer, 10, data_files=[str(path)], streaming=False)
    assert [row["input_ids"] for row in data] == [[2, 3, 4, 5, 2, 1, 2, 1, 3, 4]]


class _TokenizerWithoutSplitOption:
    """A tokenizer that, like mistral-common, refuses split_special_tokens and parses special-token text."""

    def __init__(self):
        self.inner = MythosTokenizer(split_special_tokens=False)
        self.eos_token_id = self.inner.eos_token_id

    def __call__(self, text, add_special_tokens=True, **kwargs):
        if kwargs:
            raise ValueError(f"unsupported options {sorted(kwargs)}")
        return self.inner(text, add_special_tokens=add_special_tokens)


def test_a_tokenizer_that_turns_text_into_eos_is_refused(tmp_path):
    tokenizer = _TokenizerWithoutSplitOption()
    path = write_paragraphs(tmp_path / "plain.txt", ["plain text " * 10, "more plain text " * 10])
    assert len(pretraining_dataset(tokenizer, 32, data_files=[str(path)], streaming=False)) == 8
    path = write_paragraphs(tmp_path / "web.txt", ["plain text " * 10, "a literal <eos> marker"])
    with pytest.raises(ValueError, match=r"row 2 of .*web\.txt.* tokenizes to the EOS id 2.*split_special"):
        pretraining_dataset(tokenizer, 32, data_files=[str(path)], streaming=False)


class TestEmptyData:
    @pytest.mark.parametrize("streaming", [False, True])
    @pytest.mark.parametrize(("filename", "content"), [
        ("empty.txt", ""), ("blank.txt", "\n\n   \n\t\n"), ("empty.jsonl", ""), ("blank.jsonl", "\n\n"),
        ("empty.csv", ""), ("empty.parquet", ""),
    ])
    def test_an_empty_or_blank_file(self, tmp_path, filename, content, streaming):
        path = tmp_path / filename
        path.write_text(content)
        with pytest.raises(ValueError, match=rf"the dataset is empty: data_files=\['.*{filename}'\]"):
            pretraining_dataset(MythosTokenizer(), 8, data_files=[str(path)], streaming=streaming)

    def test_all_files_empty_names_every_file(self, tmp_path):
        files = [tmp_path / "a.txt", tmp_path / "b.txt"]
        files[0].write_text("")
        files[1].write_text("\n\n")
        with pytest.raises(ValueError, match=r"the dataset is empty: data_files=\[.*a\.txt.*b\.txt"):
            pretraining_dataset(MythosTokenizer(), 8, data_files=[str(f) for f in files])

    def test_one_empty_file_among_others_is_fine(self, tmp_path):
        (tmp_path / "a.txt").write_text("")
        write_paragraphs(tmp_path / "b.txt", ["abcdefgh"])
        data = pretraining_dataset(MythosTokenizer(), 9, data_files=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
                                   streaming=False)
        assert [row["input_ids"] for row in data] == [[b + 4 for b in b"abcdefgh"] + [2]]

    @pytest.mark.parametrize("streaming", [False, True])
    @pytest.mark.parametrize(("filename", "content"), [
        ("header.csv", "text\n"), ("blank_rows.jsonl", '{"text": ""}\n{"text": "   "}\n'),
        ("no_columns.jsonl", "{}\n{}\n"),
    ])
    def test_zero_documents(self, tmp_path, filename, content, streaming):
        path = tmp_path / filename
        path.write_text(content)
        with pytest.raises(ValueError, match=rf"the dataset is empty: split 'train' of data_files=\['.*{filename}'\]"):
            pretraining_dataset(MythosTokenizer(), 8, data_files=[str(path)], streaming=streaming)

    @pytest.mark.parametrize("streaming", [False, True])
    def test_fewer_tokens_than_one_block_names_seq_len_and_the_count(self, tmp_path, streaming):
        path = write_paragraphs(tmp_path / "short.txt", ["hello", "world!"])  # 5 + 1 + 6 + 1 tokens
        with pytest.raises(ValueError, match=r"short\.txt.*yields only 13 tokens from 2 non-blank document\(s\).*"
                                             r"`seq_len`=64"):
            pretraining_dataset(MythosTokenizer(), 64, data_files=[str(path)], streaming=streaming)


class TestBadArguments:
    @pytest.mark.parametrize("streaming", [False, True])
    def test_wrong_text_column_names_the_argument_and_the_columns(self, tmp_path, streaming):
        path = tmp_path / "data.jsonl"
        path.write_text('{"body": "hello world", "id": 1}\n')
        with pytest.raises(ValueError) as info:
            pretraining_dataset(MythosTokenizer(), 8, text_column="content", data_files=[str(path)],
                                streaming=streaming)
        message = str(info.value)
        assert "`text_column`='content'" in message and "['body', 'id']" in message and "data.jsonl" in message

    @pytest.mark.parametrize("streaming", [False, True])
    def test_a_row_whose_text_is_not_a_string(self, tmp_path, streaming):
        path = tmp_path / "data.jsonl"
        path.write_text('{"text": null}\n{"text": 42}\n')
        with pytest.raises(TypeError, match=r"row 2 of .*data\.jsonl.*`text_column`='text' holds int 42, not a string"):
            pretraining_dataset(MythosTokenizer(), 4, data_files=[str(path)], streaming=streaming)

    def test_text_column_of_the_wrong_type(self):
        with pytest.raises(TypeError, match=r"`text_column` must be a column name \(str\), got 3"):
            pretraining_dataset(MythosTokenizer(), 8, text_column=3, data_files=[str(SAMPLE_CORPUS)])

    @pytest.mark.parametrize(("seq_len", "error"), [(0, ValueError), (-4, ValueError), ("64", TypeError),
                                                    (8.0, TypeError), (True, TypeError)])
    def test_bad_seq_len_is_refused_before_any_file_is_read(self, tmp_path, seq_len, error):
        missing = tmp_path / "not-there.txt"  # reading it would raise FileNotFoundError
        with pytest.raises(error, match=rf"`seq_len` must be a positive integer, got {seq_len!r}"):
            pretraining_dataset(MythosTokenizer(), seq_len, data_files=[str(missing)])

    def test_pack_documents_refuses_a_bad_seq_len_when_called(self):
        with pytest.raises(ValueError, match="`seq_len` must be a positive integer, got 0"):
            pack_documents([[1, 2]], seq_len=0, eos_token_id=0)  # no next(): the call itself raises
