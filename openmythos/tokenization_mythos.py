"""MythosTokenizer: a byte-level tokenizer that needs no vocabulary file and no download.

Every UTF-8 byte is one token, so any string round-trips exactly and the vocabulary is tiny:

    id 0        <pad>   padding (attention_mask 0)
    id 1        <bos>   beginning of sequence (not added by default)
    id 2        <eos>   end of document: the separator used when packing pretraining text
    id 3        <unk>   ids that name no token (e.g. padded embedding rows) decode to this
    ids 4..259          the bytes 0x00..0xFF (id = byte + 4), shown as tokens "<0x00>".."<0xFF>"

vocab_size and len(tokenizer) are 260 until tokens are added with ``add_tokens``.

Encoding adds no special tokens by default: ``tok(text)["input_ids"]`` is the text's bytes, even where the text spells
a special token: ``tok("a<eos>b")`` is seven bytes, never a document boundary (``split_special_tokens=True`` is the
default; pass ``split_special_tokens=False`` to parse ``<eos>`` written in the text as the token). Pretraining packs
documents with one ``<eos>`` after each (``openmythos.training.pack_documents``), GPT-2 style, so a prompt needs no BOS.
``append_eos=True`` makes ``tok(text)`` end with ``<eos>``; ``prepend_bos=True`` starts it with ``<bos>``. Both
are saved by ``save_pretrained``.

For a real subword vocabulary use ``MythosTokenizer.from_pretrained_or_default("openai/gpt-oss-20b")``, which loads
any Hub or local tokenizer through ``AutoTokenizer`` and says what to do when it cannot.

This module imports only the standard library and transformers: ``openmythos.hub.export`` copies it next to exported
weights as remote code.
"""

import os

from transformers.tokenization_python import AddedToken, PreTrainedTokenizer, Trie
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

        split_special_tokens (`bool`, defaults to `True`): Encode text that spells a special token (the literal
            string ``"<eos>"``) as its bytes, so text from the web can never insert a document boundary and
            ``decode(..., skip_special_tokens=True)`` keeps it. ``False`` parses it as the special token, as most
            Hugging Face tokenizers do; ``tok(text, split_special_tokens=False)`` does that for one call. Tokens added
            with ``add_tokens`` (not special) are matched either way. Saved by ``save_pretrained``.

    A chat template writes its special tokens on purpose, so ``apply_chat_template`` parses them in the rendered chat;
    pass ``sanitize_control_tokens=True`` to keep special-token text inside the messages as text.
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
        split_special_tokens: bool = True,
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
            split_special_tokens=bool(split_special_tokens),
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

    def tokenize(self, text: str, **kwargs) -> list[str]:
        if not kwargs.pop("split_special_tokens", self.split_special_tokens):
            return super().tokenize(text, split_special_tokens=False, **kwargs)
        # The base class would skip every added token here; only the special ones must stay text, while tokens the
        # user added to the vocabulary (`add_tokens`) are still matched, as fast tokenizers do.
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        specials = set(self.all_special_tokens)
        plain = {t.content: t for t in self._added_tokens_decoder.values()
                 if not t.special and t.content not in specials}
        if not plain:
            return self._tokenize(text)
        pieces = self._plain_tokens_trie(tuple(plain)).split(text)
        tokens = []
        for piece, matched in zip(pieces, self._added_token_matches(pieces, plain)):
            tokens.extend([piece] if matched else self._tokenize(piece))
        return tokens

    def _plain_tokens_trie(self, contents: tuple[str, ...]) -> Trie:
        # Cached on the token set: add_tokens after a call changes the key, so the trie is rebuilt.
        cached = getattr(self, "_plain_trie_cache", None)
        if cached is None or cached[0] != contents:
            trie = Trie()
            for content in contents:
                trie.add(content)
            self._plain_trie_cache = cached = (contents, trie)
        return cached[1]

    @staticmethod
    def _added_token_matches(pieces: list[str], added: dict[str, AddedToken]) -> list[bool]:
        """Which pieces are added tokens; strips the whitespace that lstrip/rstrip tokens swallow (edits ``pieces``).

        Same rules as the non-split path: a ``single_word`` token counts only between spaces or text boundaries.
        """
        matches = [piece in added for piece in pieces]
        for i, piece in enumerate(pieces):
            token = added.get(piece) if matches[i] else None
            if token is None:
                continue
            left, right = (pieces[i - 1] if i > 0 else ""), (pieces[i + 1] if i + 1 < len(pieces) else "")
            if token.single_word and ((left and left[-1] != " ") or (right and right[0] != " ")):
                matches[i] = False  # part of a longer word: plain text
                continue
            if token.lstrip and left and not matches[i - 1]:
                pieces[i - 1] = left.rstrip()
            if token.rstrip and right and not matches[i + 1]:
                pieces[i + 1] = right.lstrip()
        return matches

    def _encode_without_added_tokens(self, text: str) -> list[int]:
        # `apply_chat_template(..., sanitize_control_tokens=True)` encodes marked user text with this: plain bytes.
        return self.convert_tokens_to_ids(self._tokenize(text))

    def apply_chat_template(self, conversation, *args, **kwargs):
        # The rendered chat is the template's markup: its `<eos>` must become the token. Messages are protected by
        # `sanitize_control_tokens=True`, which transformers implements on top of this parsing.
        previous, self.split_special_tokens = self.split_special_tokens, False
        try:
            return super().apply_chat_template(conversation, *args, **kwargs)
        finally:
            self.split_special_tokens = previous

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
