"""Pretraining data: stream a text dataset, tokenize, and pack into fixed-length blocks with EOS between documents.

The default source is the seed recipe's FineWeb-Edu ``sample-10BT`` (streamed from the Hub). Any local
``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file(s) work through ``data_files``; a ``.txt`` file is one
document per blank-line-separated paragraph block when ``paragraphs=True`` (else one document per line, as
``datasets``' text builder reads it).
"""

from collections.abc import Iterable, Iterator
from pathlib import Path

SAMPLE_CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"

_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
             ".csv": "csv"}


def pack_documents(documents: Iterable[list[int]], seq_len: int, eos_token_id: int) -> Iterator[list[int]]:
    """Concatenate tokenized documents, each followed by ``eos_token_id``, and cut the stream into ``seq_len`` blocks.

    Every token of every document is emitted exactly once, in order. Only the final remainder (fewer than
    ``seq_len`` tokens left after the last full block) is dropped.
    """
    if seq_len < 1:
        raise ValueError(f"`seq_len` must be a positive integer, got {seq_len}")
    buffer: list[int] = []
    for tokens in documents:
        buffer.extend(tokens)
        buffer.append(eos_token_id)
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            del buffer[:seq_len]


def _local_source(data_files):
    files = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
    if not files:
        raise ValueError("`data_files` is empty")
    suffixes = {Path(f).suffix.lower() for f in files}
    for f in files:
        if not Path(f).exists():
            raise FileNotFoundError(f"data file not found: {f}")
    if len(suffixes) != 1 or next(iter(suffixes)) not in _BUILDERS:
        raise ValueError(f"`data_files` must share one extension among {sorted(_BUILDERS)}, got {sorted(suffixes)}")
    return _BUILDERS[suffixes.pop()], [str(f) for f in files]


def load_text_dataset(dataset: str | None = "HuggingFaceFW/fineweb-edu", name: str | None = "sample-10BT",
                      split: str = "train", data_files=None, streaming: bool = True, paragraphs: bool = True):
    """The raw text dataset: a Hub dataset (streamed by default) or local files when ``data_files`` is given."""
    import datasets

    if data_files is not None:
        builder, files = _local_source(data_files)
        if builder == "text" and paragraphs:
            return datasets.load_dataset("text", data_files=files, split=split, sample_by="paragraph",
                                         streaming=streaming)
        return datasets.load_dataset(builder, data_files=files, split=split, streaming=streaming)
    return datasets.load_dataset(dataset, name=name, split=split, streaming=streaming)


def pretraining_dataset(tokenizer, seq_len: int, *, max_seq_len: int | None = None, text_column: str = "text",
                        dataset: str | None = "HuggingFaceFW/fineweb-edu", name: str | None = "sample-10BT",
                        split: str = "train", data_files=None, streaming: bool = True, paragraphs: bool = True):
    """A dataset of ``{"input_ids": [seq_len ints]}`` blocks ready for ``Trainer`` (labels = input_ids).

    Raises a ``ValueError`` before any training when the text column is missing, ``seq_len`` exceeds the model's
    ``max_seq_len``, the tokenizer has no EOS token, or the data yields not even one full block.
    Streaming sources give an ``IterableDataset`` (set ``max_steps`` in TrainingArguments); local non-streaming
    sources give a map-style ``Dataset``.
    """
    import datasets

    if max_seq_len is not None and seq_len > max_seq_len:
        raise ValueError(f"`seq_len`={seq_len} exceeds the model's max_seq_len={max_seq_len}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; packing needs one to separate documents")
    try:
        raw = load_text_dataset(dataset, name, split, data_files, streaming, paragraphs)
    except ValueError as error:
        if "corresponds to no data" not in str(error):
            raise
        raise ValueError(f"the dataset is empty: split {split!r} of {data_files or dataset} has no rows") from error
    columns = raw.column_names if raw.column_names is not None else list(next(iter(raw)).keys())
    if text_column not in columns:
        raise ValueError(f"the dataset has no text column {text_column!r}; its columns are {columns}. "
                         f"Pass text_column=<one of them>.")

    def documents():
        for example in raw:
            text = example[text_column]
            if text and text.strip():
                yield tokenizer(text, add_special_tokens=False)["input_ids"]

    def blocks():
        for block in pack_documents(documents(), seq_len, eos):
            yield {"input_ids": block}

    first = next(blocks(), None)
    if first is None:
        raise ValueError(f"the dataset is empty or shorter than one block of seq_len={seq_len} tokens")
    if streaming:
        return datasets.IterableDataset.from_generator(blocks)
    return datasets.Dataset.from_list(list(blocks()))


def causal_lm_collator(examples: list[dict]) -> dict:
    """Stack equal-length packed blocks; labels are the input ids (the model shifts them)."""
    import torch

    input_ids = torch.tensor([example["input_ids"] for example in examples], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}
