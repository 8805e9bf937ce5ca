"""MythosTokenizer: a byte-level tokenizer that needs no vocabulary file and no download.

Every UTF-8 byte is one token, so any string round-trips exactly and the vocabulary is tiny:

    id 0        <pad>   padding (attention_mask 0)
    id 1        <bos>   beginning of sequence (not added by default)
    id 2        <eos>   end of document: the separator used when packing pretraining text
    id 3        <unk>   ids that name no token (e.g. padded embedding rows) decode to this
    ids 4..259          the bytes 0x00..0xFF (id = byte + 4), shown as tokens "<0x00>".."<0xFF>"

vocab_size and len(tokenizer) are 260 until tokens are added with ``add_tokens``.

Encoding adds no special tokens by default: ``tok(text)["input_ids"]`` is the text's bytes. Pretraining packs
documents with one ``<eos>`` after each (``openmythos.data.pack_documents``), GPT-2 style, so a prompt needs no BOS.
``append_eos=True`` makes ``tok(text)`` end with ``<eos>``; ``prepend_bos=True`` starts it with ``<bos>``. Both
are saved by ``save_pretrained``.

For a real subword vocabulary use ``MythosTokenizer.from_pretrained_or_default("openai/gpt-oss-20b")``, which loads
any Hub or local tokenizer through ``AutoTokenizer`` and says what to do when it cannot.

This module imports only the standard library and transformers: ``openmythos.hub.export`` copies it next to exported
weights as remote code.
"""

import os

from transformers.tokenization_python import AddedToken, PreTrainedTokenizer
from transformers.utils import logging

logger = logging.get_logger(__name__)

_BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
_TOKEN_TO_BYTE = {token: b for b, token in enumerate(_BYTE_TOKENS)}


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (e.g. half an emoji from a broken JSON escape) are not encodable; like tiktoken, turn each
        # into one U+FFFD instead of failing in the middle of a dataset.
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


class MythosTokenizer(PreTrainedTokenizer):
    """Byte-level tokenizer: ids 0-3 are ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; ids 4-259 are the UTF-8 bytes.

    Args:
        pad_token, bos_token, eos_token, unk_token (`str`): Text of the special tokens at ids 0, 1, 2 and 3.
        prepend_bos (`bool`, defaults to `False`): Start every encoded sequence with ``<bos>`` when
            ``add_special_tokens=True`` (the default of ``tok(...)``).
        append_eos (`bool`, defaults to `False`): End every encoded sequence with ``<eos>`` when
            ``add_special_tokens=True``.

    Decoding joins the bytes and decodes them as UTF-8 with ``errors="replace"``: an invalid or cut-off sequence
    (e.g. a generation stopped inside a multi-byte character) becomes U+FFFD instead of raising.

    Special-token text written inside the input (the literal string ``"<eos>"``) is encoded as that special token, as
    in every Hugging Face tokenizer; pass ``split_special_tokens=True`` to encode it as plain bytes instead.
    """

    model_input_names = ["input_ids", "attention_mask"]
    vocab_files_names = {}
    byte_offset = 4  # the special tokens come first, so byte b has id b + 4

    def __init__(
        self,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        prepend_bos: bool = False,
        append_eos: bool = False,
        **kwargs,
    ):
        specials = [pad_token, bos_token, eos_token, unk_token]
        specials = [
            AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=True) if isinstance(t, str) else t
            for t in specials
        ]
        # Fixed ids for the special tokens; a saved tokenizer's added_tokens_decoder (passed in kwargs) overrides.
        self._added_tokens_decoder = dict(enumerate(specials))
        self.prepend_bos = bool(prepend_bos)
        self.append_eos = bool(append_eos)
        super().__init__(
            pad_token=specials[0],
            bos_token=specials[1],
            eos_token=specials[2],
            unk_token=specials[3],
            prepend_bos=self.prepend_bos,
            append_eos=self.append_eos,
            **kwargs,
        )

    @property
    def special_tokens_pattern(self) -> str:
        # The base class builds inputs from this; deriving it keeps `tok.append_eos = True` after init working.
        return {(False, False): "none", (True, False): "bos", (False, True): "eos", (True, True): "bos_eos"}[
            (self.prepend_bos, self.append_eos)]

    @special_tokens_pattern.setter
    def special_tokens_pattern(self, value):
        if value is not None and value != self.special_tokens_pattern:
            raise ValueError(f"MythosTokenizer takes prepend_bos/append_eos, not special_tokens_pattern={value!r}")

    @property
    def vocab_size(self) -> int:
        return self.byte_offset + 256

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.convert_ids_to_tokens(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [_BYTE_TOKENS[b] for b in _utf8(text)]

    def _convert_token_to_id(self, token: str) -> int:
        byte = _TOKEN_TO_BYTE.get(token)
        return self.unk_token_id if byte is None else byte + self.byte_offset

    def _convert_id_to_token(self, index: int) -> str:
        byte = index - self.byte_offset
        return _BYTE_TOKENS[byte] if 0 <= byte < 256 else self.unk_token

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # Join bytes first and decode once: a character's bytes are several tokens.
        data = bytearray()
        for token in tokens:
            byte = _TOKEN_TO_BYTE.get(token)
            if byte is None:
                data += token.encode("utf-8")  # a special or added token: its text
            else:
                data.append(byte)
        return data.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is the 256 bytes; tokenizer_config.json holds everything else

    @classmethod
    def from_pretrained_or_default(cls, name_or_path: str | os.PathLike | None = None, *, fallback: bool = False,
                                   **kwargs):
        """The tokenizer at ``name_or_path`` (a Hub name or local folder), or the byte-level default.

        ``name_or_path=None`` returns ``MythosTokenizer()``. Otherwise the tokenizer is loaded with
        ``transformers.AutoTokenizer.from_pretrained(name_or_path, **kwargs)``, so any Hub tokenizer works (the seed
        tokenizer is ``"openai/gpt-oss-20b"``). When that fails with an ``OSError`` (offline, not downloaded, no such
        repo or folder) this raises an ``OSError`` that says what to do, or, with ``fallback=True``, logs a warning and
        returns ``MythosTokenizer()``. The model's ``vocab_size`` must then be ``len(tokenizer)``.
        """
        if name_or_path is None:
            return cls()
        from huggingface_hub.constants import is_offline_mode
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        except OSError as err:
            name = os.fspath(name_or_path)
            if os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
                hint = f"no tokenizer could be read from the folder {name!r}; check the path"
            elif is_offline_mode():
                hint = (f"offline mode is on (HF_HUB_OFFLINE=1) and {name!r} is not in the local cache: download it "
                        f"where the Hub is reachable (`hf download {name}`) and copy the cache or folder here, "
                        f"or unset HF_HUB_OFFLINE")
            else:
                hint = (f"the Hub could not serve {name!r}: check the name, your network, and `hf auth login` for "
                        f"gated repos, or pass a local folder")
            message = (f"could not load the tokenizer {name!r} ({err}). {hint}. To train without it, use the built-in "
                       f"byte-level tokenizer: MythosTokenizer() or from_pretrained_or_default(..., fallback=True) "
                       f"(vocab_size 260).")
            if not fallback:
                raise OSError(message) from err
            logger.warning("%s Falling back to the byte-level MythosTokenizer (vocab_size 260).", message)
            return cls()


__all__ = ["MythosTokenizer"]
