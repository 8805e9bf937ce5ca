import pytest

from openmythos.data import SAMPLE_CORPUS, causal_lm_collator, pack_documents, pretraining_dataset
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
