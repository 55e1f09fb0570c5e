r"""Incremental detokenization of one request's output, with stop strings.

Each engine step hands a request's new token ids to :meth:`IncrementalDetokenizer.update`,
which returns the text that became final. Deltas concatenate to exactly
``tokenizer.decode(output_ids, skip_special_tokens)`` (cut at a stop string), the same text
as decoding everything at the end, but each step decodes only a small window of ids:

    ids  [ ...... | ............. | ............. | <0xE4> <0xB8> ]
                  ^prefix_offset  ^read_offset    ^stable_end
                   \_ context ___/ \_ new text __/ \_ held back _/

``decode(ids[prefix_offset:stable_end])`` minus ``decode(ids[prefix_offset:read_offset])`` is
the new text. The prefix window gives the decoder the context it needs (sentencepiece drops
one leading space of a decoded string, so both decodes drop it alike), and the window moves
forward after each emission, so the cost per step is O(new tokens).

Sentencepiece byte fallback decodes a run of consecutive ``<0xNN>`` tokens as one UTF-8
sequence: an incomplete run decodes to U+FFFD, and a later stray byte turns even a complete
run into U+FFFD characters. So a trailing run of byte tokens is held back until a non-byte
token (or the end of the stream) closes it; no half character is ever emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class DetokenizerTokenizer(Protocol):
    """What the detokenizer needs of a tokenizer (caldera.engine.tokenizer.Tokenizer)."""

    byte_fallback_ids: frozenset[int]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def is_special(self, token_id: int) -> bool: ...


class _WindowDecoder:
    """Token ids in, final text out; knows nothing of stop strings."""

    def __init__(self, tokenizer: DetokenizerTokenizer, skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._byte_ids = tokenizer.byte_fallback_ids
        # Without byte fallback (byte-level BPE), an incomplete character shows as a trailing
        # U+FFFD that a later token completes: hold such text back.
        self._hold_replacement = not self._byte_ids
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""
        self._run_start: int | None = None  # start of the trailing byte-token run

    def add(self, new_ids: Sequence[int]) -> str:
        for token_id in new_ids:
            # Dropping skipped specials here is what decode(skip_special_tokens=True) does
            # before its decoder runs, so the window never fills up with them.
            if self._skip and self._tokenizer.is_special(token_id):
                continue
            if token_id in self._byte_ids:
                if self._run_start is None:
                    self._run_start = len(self._ids)
            else:
                self._run_start = None
            self._ids.append(token_id)
        stable_end = len(self._ids) if self._run_start is None else self._run_start
        return self._emit(stable_end, final=False)

    def flush(self) -> str:
        """Everything still held back, at the end of the stream."""
        self._run_start = None
        return self._emit(len(self._ids), final=True)

    def _emit(self, stable_end: int, final: bool) -> str:
        if stable_end <= self._read_offset:
            return ""
        text = self._tokenizer.decode(self._ids[self._prefix_offset : stable_end], self._skip)
        if not final and self._hold_replacement and text.endswith(REPLACEMENT_CHAR):
            return ""
        if len(text) <= len(self._prefix_text):
            # Nothing new yet (e.g. a lone "▁" whose space the decoder strips): keep the
            # window and look again with more tokens.
            return ""
        delta = text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, stable_end
        self._prefix_text = self._tokenizer.decode(
            self._ids[self._prefix_offset : self._read_offset], self._skip
        )
        return delta


class IncrementalDetokenizer:
    """Turns one request's output token ids into streamed text, applying stop strings.

    ``update(new_ids)`` returns the newly final text; ``flush()`` returns what was held back
    when the stream ends (bytes of an unclosed UTF-8 sequence, text that could have begun a
    stop string). Without stop strings, all deltas together equal
    ``tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)``: the output is
    decoded on its own, so a first token ``"▁Hello"`` gives ``"Hello"``.

    Stop strings are matched in the decoded text, also across token boundaries. On a match
    ``finished_by_stop`` is set to that stop string and the text ends before it (or after it
    with ``include_stop_str_in_output``); later updates return "". Text that may be the start
    of a stop string is held back until the next tokens decide it.

    ``prompt_token_ids`` are kept for the caller; the output text does not depend on them.
    """

    def __init__(
        self,
        tokenizer: DetokenizerTokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.prompt_token_ids = prompt_token_ids
        self._decoder = _WindowDecoder(tokenizer, skip_special_tokens)
        self._stops = [s for s in (stop or []) if s]
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        self._include_stop = include_stop_str_in_output
        self._text = ""  # decoded text so far, cut at a stop string once one matched
        self._emitted = 0  # length of the prefix of _text already returned
        self.finished_by_stop: str | None = None

    @property
    def output_text(self) -> str:
        """The concatenation of every delta returned so far."""
        return self._text[: self._emitted]

    @property
    def finished(self) -> bool:
        return self.finished_by_stop is not None

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Feeds the step's new token ids; returns the text that became final."""
        if self.finished:
            return ""
        return self._append(self._decoder.add(new_token_ids), final=False)

    def flush(self) -> str:
        """Ends the stream: returns everything still held back (or "" after a stop)."""
        if self.finished:
            return ""
        return self._append(self._decoder.flush(), final=True)

    def _append(self, decoded: str, final: bool) -> str:
        checked_until = len(self._text)
        self._text += decoded
        if self._stops and decoded:
            self._check_stop(checked_until)
        if self.finished or final:
            end = len(self._text)
        else:
            end = len(self._text) - self._stop_prefix_len()
        delta = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta

    def _check_stop(self, checked_until: int) -> None:
        """Looks for stop strings ending in the newly decoded text; keeps the earliest."""
        start = max(0, checked_until - self._max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop in self._stops:
            index = self._text.find(stop, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return
        index, stop = best
        self.finished_by_stop = stop
        self._text = self._text[: index + len(stop) if self._include_stop else index]

    def _stop_prefix_len(self) -> int:
        """Length of the longest not-yet-emitted suffix that could begin a stop string."""
        if not self._stops or self._include_stop:
            # Included stop strings are output anyway; only text after them is cut.
            return 0
        pending = self._text[self._emitted :]
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(pending)), longest, -1):
                if pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest
