"""Pretraining data: stream a text dataset, tokenize, and pack into fixed-length blocks with EOS between documents.

The default source is the seed recipe's FineWeb-Edu ``sample-10BT`` (streamed from the Hub). Any local
``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file(s) work through ``data_files``; a ``.txt`` file is one
document per blank-line-separated paragraph block when ``paragraphs=True`` (else one document per line, as
``datasets``' text builder reads it).
"""

from collections.abc import Iterable, Iterator
from pathlib import Path

# The corpus ships in the package's data folder (setup.py package_data), one level above this module.
SAMPLE_CORPUS = Path(__file__).resolve().parents[1] / "data" / "tiny_corpus.txt"

_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
             ".csv": "csv"}


def pack_documents(documents: Iterable[list[int]], seq_len: int, eos_token_id: int) -> Iterator[list[int]]:
    """Concatenate tokenized documents, each followed by ``eos_token_id``, and cut the stream into ``seq_len`` blocks.

    Every token of every document is emitted exactly once, in order. Only the final remainder (fewer than
    ``seq_len`` tokens left after the last full block) is dropped. A bad ``seq_len`` raises here, not at the first
    ``next()``.
    """
    _check_seq_len(seq_len)
    return _pack(documents, seq_len, eos_token_id)


def _check_seq_len(seq_len):
    if isinstance(seq_len, bool) or not isinstance(seq_len, int):
        raise TypeError(f"`seq_len` must be a positive integer, got {seq_len!r} ({type(seq_len).__name__})")
    if seq_len < 1:
        raise ValueError(f"`seq_len` must be a positive integer, got {seq_len}")


def _pack(documents, seq_len, eos_token_id):
    buffer: list[int] = []
    for tokens in documents:
        buffer.extend(tokens)
        buffer.append(eos_token_id)
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            del buffer[:seq_len]


def _file_list(data_files) -> list[str]:
    return [str(data_files)] if isinstance(data_files, (str, Path)) else [str(f) for f in data_files]


def _local_source(data_files):
    files = _file_list(data_files)
    if not files:
        raise ValueError("`data_files` is empty: pass at least one file")
    suffixes = {Path(f).suffix.lower() for f in files}
    for f in files:
        if not Path(f).exists():
            raise FileNotFoundError(f"data file not found: {f}")
    if len(suffixes) != 1 or next(iter(suffixes)) not in _BUILDERS:
        raise ValueError(f"`data_files` must share one extension among {sorted(_BUILDERS)}, got {sorted(suffixes)}")
    builder = _BUILDERS[suffixes.pop()]
    # `datasets` fails on these with DatasetGenerationError or StopIteration; say what is wrong instead.
    if all(_holds_no_text(f, builder) for f in files):
        raise ValueError(f"the dataset is empty: data_files={files} hold no text (the files are empty or hold only "
                         f"blank lines)")
    return builder, files


def _holds_no_text(path: str, builder: str) -> bool:
    """Whether the file is empty, or for text formats holds only whitespace; reads only up to the first text."""
    with open(path, "rb") as f:
        if builder == "parquet":
            return not f.read(1)
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _describe_source(dataset, name, split, data_files) -> str:
    if data_files is not None:
        return f"split {split!r} of data_files={_file_list(data_files)}"
    return f"split {split!r} of dataset {dataset!r}" + (f" (config {name!r})" if name else "")


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
    ``max_seq_len``, the tokenizer has no EOS token, the dataset is empty (no file text, no rows, or only blank
    documents), or the data yields fewer tokens than one full block.
    The EOS id appears only where packing puts it: text that spells the EOS token (``"<eos>"`` in web text) is
    tokenized as text (``split_special_tokens=True``), and a tokenizer that still turns text into its EOS id is
    refused with a ``ValueError``.
    Streaming sources give an ``IterableDataset`` (set ``max_steps`` in TrainingArguments); local non-streaming
    sources give a map-style ``Dataset``.
    """
    import datasets

    _check_seq_len(seq_len)
    if max_seq_len is not None and seq_len > max_seq_len:
        raise ValueError(f"`seq_len`={seq_len} exceeds the model's max_seq_len={max_seq_len}")
    if not isinstance(text_column, str):
        raise TypeError(f"`text_column` must be a column name (str), got {text_column!r}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; packing needs one to separate documents")
    source = _describe_source(dataset, name, split, data_files)
    try:
        raw = load_text_dataset(dataset, name, split, data_files, streaming, paragraphs)
    except ValueError as error:
        if "corresponds to no data" not in str(error):
            raise
        raise ValueError(f"the dataset is empty: {source} has no rows") from error
    _check_text_column(raw, text_column, source)
    encode = _text_encoder(tokenizer, eos, source)
    seen = {"documents": 0, "tokens": 0}

    def documents():
        for row, example in enumerate(raw, 1):
            text = example[text_column]
            if text is not None and not isinstance(text, str):
                raise TypeError(f"row {row} of {source}: `text_column`={text_column!r} holds {type(text).__name__} "
                                f"{str(text)[:80]}, not a string; pass the column that holds the text")
            if text and text.strip():  # missing (None) and blank rows are no documents
                ids = encode(text, row)
                seen["documents"] += 1
                seen["tokens"] += len(ids) + 1  # with its EOS
                yield ids

    def blocks():
        for block in _pack(documents(), seq_len, eos):
            yield {"input_ids": block}

    if next(blocks(), None) is None:  # the counts now cover the whole dataset
        if not seen["documents"]:
            raise ValueError(f"the dataset is empty: {source} has no non-blank text in `text_column`={text_column!r}")
        raise ValueError(f"{source} yields only {seen['tokens']} tokens from {seen['documents']} non-blank "
                         f"document(s) (each followed by EOS), fewer than one block of `seq_len`={seq_len}; lower "
                         f"seq_len or add data")
    if streaming:
        return datasets.IterableDataset.from_generator(blocks)
    return datasets.Dataset.from_list(list(blocks()))


def _check_text_column(raw, text_column: str, source: str) -> None:
    columns = raw.column_names
    if columns is None:  # a stream whose features are unknown until read
        first = next(iter(raw), None)
        columns = None if first is None else list(first)
    if not columns:
        raise ValueError(f"the dataset is empty: {source} has no rows")
    if text_column not in columns:
        raise ValueError(f"the dataset has no text column {text_column!r}: `text_column`={text_column!r} is not "
                         f"among its columns {list(columns)} ({source}). Pass text_column=<one of them>.")


def _text_encoder(tokenizer, eos: int, source: str):
    """``text -> ids`` that keeps special-token text as text, so only packing writes ``eos`` into the stream."""
    options = {"split_special_tokens": True}
    try:
        tokenizer("", add_special_tokens=False, **options)
    except (TypeError, ValueError):  # a tokenizer without the option (mistral-common refuses it): the check below
        options = {}

    def encode(text: str, row: int) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False, **options)["input_ids"]
        if eos in ids:
            raise ValueError(f"row {row} of {source} tokenizes to the EOS id {eos} (text {text[:80]!r}): this "
                             f"tokenizer turns text into its EOS token, which would put false document boundaries in "
                             f"the packed data. Use a tokenizer that supports split_special_tokens=True.")
        return ids

    return encode


def causal_lm_collator(examples: list[dict]) -> dict:
    """Stack equal-length packed blocks; labels are the input ids (the model shifts them)."""
    import torch

    input_ids = torch.tensor([example["input_ids"] for example in examples], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}
