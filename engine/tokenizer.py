"""The checkpoint's tokenizer, read from its tokenizer.json with the `tokenizers` library.

Token ids are the ones transformers gives for the same folder: ``encode(text)`` equals
``AutoTokenizer.from_pretrained(dir)(text).input_ids`` (the BOS the processor adds comes from
the tokenizer's post-processor, once), and ``decode`` equals ``tokenizer.decode``. Special
tokens are named in tokenizer_config.json, overridden by special_tokens_map.json, as
transformers reads them.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _HFTokenizer

IMAGE_TOKEN = "<image>"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def read_special_tokens_map(model_dir: str | os.PathLike) -> dict[str, str]:
    """``{"bos_token": "<s>", ...}`` for the named special tokens the folder declares.

    tokenizer_config.json first, then special_tokens_map.json on top (transformers' order).
    Chat templates see these names as variables.
    """
    folder = Path(model_dir)
    tokens: dict[str, str] = {}
    for source in (folder / "tokenizer_config.json", folder / "special_tokens_map.json"):
        data = _read_json(source)
        for name in SPECIAL_TOKEN_NAMES:
            content = _token_content(data.get(name))
            if content is not None:
                tokens[name] = content
    return tokens


def _extra_special_tokens(config: dict, special_map: dict) -> list[str]:
    """additional_special_tokens (transformers 4) / extra_special_tokens (transformers 5)."""
    extra: list[str] = []
    for data in (config, special_map):
        for key in ("additional_special_tokens", "extra_special_tokens"):
            values = data.get(key)
            if isinstance(values, list):
                extra += [c for c in map(_token_content, values) if c is not None]
    return extra


class Tokenizer:
    """A model folder's tokenizer: encode, decode and the special token ids.

    Build it with :meth:`from_model_dir`; the constructor takes an already loaded
    ``tokenizers.Tokenizer`` and the special token strings.
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        special_tokens: dict[str, str],
        extra_special_tokens: Sequence[str] = (),
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
    ) -> None:
        self._tok = backend
        self.special_tokens_map = dict(special_tokens)
        # transformers registers every named special token as a special added token, so that
        # decode(skip_special_tokens=True) drops it even when it is also a base-vocab entry.
        named = [*special_tokens.values(), *extra_special_tokens]
        missing = [t for t in dict.fromkeys(named) if not self._is_special_added(t)]
        if missing:
            backend.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in missing]
            )
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))
        self._special_ids = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )
        self.byte_fallback_ids = self._byte_fallback_ids()

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike) -> Tokenizer:
        """Loads ``tokenizer.json`` and the special tokens of a llava-hf model folder."""
        folder = Path(model_dir)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {folder}: the model folder must hold a fast-tokenizer "
                "file (save the tokenizer with transformers' save_pretrained to write one)"
            )
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        # An explicit add_bos_token / add_eos_token rebuilds the post-processor in transformers;
        # otherwise tokenizer.json's own post-processor decides.
        add_bos = config.get("add_bos_token")
        add_eos = config.get("add_eos_token")
        return cls(
            _HFTokenizer.from_file(str(path)),
            read_special_tokens_map(folder),
            _extra_special_tokens(config, special_map),
            add_bos_token=add_bos if isinstance(add_bos, bool) else None,
            add_eos_token=add_eos if isinstance(add_eos, bool) else None,
        )

    # -- setup helpers -------------------------------------------------------------------------

    def _is_special_added(self, token: str) -> bool:
        return any(
            t.content == token and t.special for t in self._tok.get_added_tokens_decoder().values()
        )

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos, eos = (
            self.special_tokens_map.get("bos_token"),
            self.special_tokens_map.get("eos_token"),
        )
        add_bos = add_bos and bos is not None and self._tok.token_to_id(bos) is not None
        add_eos = add_eos and eos is not None and self._tok.token_to_id(eos) is not None
        single = " ".join(
            [*([f"{bos}:0"] if add_bos else []), "$A:0", *([f"{eos}:0"] if add_eos else [])]
        )
        pair = (
            single
            + " "
            + " ".join(
                [*([f"{bos}:1"] if add_bos else []), "$B:1", *([f"{eos}:1"] if add_eos else [])]
            )
        )
        special = [
            (t, self._tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on
        ]
        self._tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special
        )

    def _byte_fallback_ids(self) -> frozenset[int]:
        """Ids of sentencepiece byte tokens ``<0x00>``..``<0xFF>`` when the model falls back to
        bytes; consecutive ones decode together as one UTF-8 sequence."""
        if not getattr(self._tok.model, "byte_fallback", False):
            return frozenset()
        vocab = self._tok.get_vocab(with_added_tokens=False)
        return frozenset(i for tok, i in vocab.items() if _BYTE_TOKEN.match(tok))

    # -- encode / decode -----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the BOS the processor adds."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``, as transformers' ``tokenizer.decode`` gives it."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """Token strings (``"▁Hello"``, ``"<0x0A>"``) of one id or a list of ids."""
        if isinstance(ids, int):
            return self._token(ids)
        return [self._token(i) for i in ids]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (OpenAI's logprob ``bytes``): a byte-fallback
        token's byte, a byte-level BPE token's bytes, a sentencepiece piece with its leading
        space. An id with no token (a vocabulary padded past the tokenizer) has none."""
        token = self._tok.id_to_token(token_id)
        if token is None:
            return b""
        if token_id in self.byte_fallback_ids:
            return bytes([int(token[3:5], 16)])
        if self._byte_level:
            table = _byte_decoder()
            if all(ch in table for ch in token):
                return bytes(table[ch] for ch in token)
        if self.is_special(token_id):
            return token.encode()
        return token.replace("\u2581", " ").encode()

    @functools.cached_property
    def _byte_level(self) -> bool:
        return "ByteLevel" in type(self._tok.decoder).__name__ if self._tok.decoder else False

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    def _token(self, token_id: int) -> str:
        token = self._tok.id_to_token(token_id)
        if token is None:
            raise ValueError(
                f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        return token

    # -- special tokens ------------------------------------------------------------------------

    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._named_id("unk_token")

    @property
    def image_token_id(self) -> int | None:
        """Id of ``<image>`` (the placeholder each image expands from), or None."""
        return self._tok.token_to_id(IMAGE_TOKEN)

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added tokens (32002 for llava-hf; the model's
        embedding may be padded larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids that ``decode(skip_special_tokens=True)`` drops: bos/eos/unk/pad and every
        added token marked special (``<image>`` included)."""
        return sorted(self._special_ids)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def __len__(self) -> int:
        return self.vocab_size


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}
