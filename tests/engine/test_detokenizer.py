"""Incremental detokenizer: streamed deltas add up to tokenizer.decode(output ids), never show
half a character, and stop strings cut the text even when split across tokens."""

from __future__ import annotations

import random

import pytest

from caldera.engine.detokenizer import IncrementalDetokenizer
from caldera.engine.tokenizer import Tokenizer

SPECIAL = [0, 1, 2, 32000, 32001]


@pytest.fixture(scope="module")
def tok(llava15_dir):
    return Tokenizer.from_model_dir(llava15_dir)


def byte_tokens(tok, text):
    """``text`` spelled as sentencepiece byte-fallback tokens ``<0xNN>``."""
    return [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in text.encode()]


def stream(tok, ids, chunk_sizes=(1,), **kwargs):
    """Feeds ids in chunks; returns (deltas, detokenizer) with flush()'s delta last."""
    detok = IncrementalDetokenizer(tok, [1, 22557], **kwargs)
    deltas, i, k = [], 0, 0
    while i < len(ids):
        size = chunk_sizes[k % len(chunk_sizes)]
        deltas.append(detok.update(ids[i : i + size]))
        i, k = i + size, k + 1
    deltas.append(detok.flush())
    return deltas, detok


def random_ids(tok, rng, pieces):
    ids = []
    for _ in range(rng.randint(0, 40)):
        r = rng.random()
        if r < 0.3:
            ids.append(rng.choice(sorted(tok.byte_fallback_ids)))
        elif r < 0.45:
            ids.append(rng.choice(pieces))
        elif r < 0.55:
            ids.append(rng.choice(SPECIAL))
        elif r < 0.6:
            ids.append(28705)  # "▁" alone: a space the decoder strips at the start
        else:
            ids.append(rng.randrange(tok.vocab_size))
        if rng.random() < 0.05:
            ids += byte_tokens(tok, rng.choice(["é", "😀", "世", "\n", "€"]))
    return ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_concatenate_to_decode(tok, skip_special_tokens):
    rng = random.Random(1234)
    pieces = tok.encode(
        "世界你好 日本語の文字 한국어 😀🎉👍 café naïve ❄", add_special_tokens=False
    )
    for _ in range(400):
        ids = random_ids(tok, rng, pieces)
        chunks = tuple(rng.randint(1, 4) for _ in range(3))
        deltas, detok = stream(tok, ids, chunks, skip_special_tokens=skip_special_tokens)
        expected = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == detok.output_text == expected, ids
        assert detok.finished_by_stop is None


def test_multibyte_characters_split_over_byte_tokens_are_held_whole(tok):
    text = "é😀世€\n"
    ids = byte_tokens(tok, text) + cont(tok, "ok")
    deltas, _ = stream(tok, ids)
    assert "".join(deltas) == text + "ok"
    assert all("\ufffd" not in d for d in deltas)
    # Nothing of the byte run comes out until a non-byte token closes it.
    assert deltas[: len(byte_tokens(tok, text))] == [""] * len(byte_tokens(tok, text))


def test_stray_byte_after_complete_character_matches_decode(tok):
    """A later continuation byte turns the whole run into U+FFFD, as decode does."""
    ids = byte_tokens(tok, "é") + [tok.convert_tokens_to_ids("<0xA9>")] + cont(tok, "x")
    deltas, _ = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == "\ufffd\ufffd\ufffdx"


def test_unfinished_bytes_are_flushed_at_the_end(tok):
    ids = tok.encode("ab", add_special_tokens=False) + byte_tokens(tok, "😀")[:2]
    detok = IncrementalDetokenizer(tok, [])
    assert detok.update(ids) == "ab"
    assert detok.flush() == "\ufffd\ufffd" == tok.decode(ids)[2:]


def test_leading_space_as_decode(tok):
    ids = tok.encode("Hello world", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids[0]).startswith("▁")
    deltas, _ = stream(tok, ids)
    assert deltas[0] == "Hello" and "".join(deltas) == "Hello world"


def test_special_tokens_kept_or_skipped(tok):
    ids = (
        tok.encode("hi", add_special_tokens=False)
        + [32000]
        + tok.encode(" there", add_special_tokens=False)
        + [2]
    )
    assert "".join(stream(tok, ids, skip_special_tokens=True)[0]) == "hi there"
    assert "".join(stream(tok, ids, skip_special_tokens=False)[0]) == tok.decode(ids)


# -- stop strings ---------------------------------------------------------------------------


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def cont(tok, text):
    """Ids of ``text`` continuing a line: without the "▁" sentencepiece puts at the start."""
    return encode(tok, "\n" + text)[2:]


def test_stop_string_split_across_tokens(tok):
    ids = encode(tok, "The answer is 42. ###END### and more text")
    deltas, detok = stream(tok, ids, stop=["###END###"])
    assert detok.finished_by_stop == "###END###"
    assert "".join(deltas) == detok.output_text == "The answer is 42. "
    assert not any("#" in d for d in deltas)


def test_stop_string_included(tok):
    ids = encode(tok, "one two STOP three")
    deltas, detok = stream(tok, ids, stop=["STOP"], include_stop_str_in_output=True)
    assert "".join(deltas) == "one two STOP"
    assert detok.finished_by_stop == "STOP"


def test_possible_stop_prefix_is_held_then_released(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["Observation:"])
    out = detok.update(encode(tok, "Think. Obs"))
    assert out == "Think. "
    assert detok.update(cont(tok, "cure")) == "Obscure"
    assert detok.update(encode(tok, " Observ")) == " "
    assert detok.flush() == "Observ"
    assert detok.output_text == "Think. Obscure Observ"
    assert detok.finished_by_stop is None


def test_prefix_released_when_it_stops_matching(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["\n\nUser:"])
    text = ""
    for piece in ["Hello", "\n", "\n", "Done", " now"]:
        text += detok.update(cont(tok, piece) if piece != "\n" else [13])
    text += detok.flush()
    assert detok.output_text == text == "Hello\n\nDone now"


def test_earliest_stop_wins_and_later_tokens_are_ignored(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["world", "lo"])
    assert detok.update(encode(tok, "hello world")) == "hel"
    assert detok.finished_by_stop == "lo"
    assert detok.update(encode(tok, " again")) == ""
    assert detok.flush() == ""
    assert detok.output_text == "hel"


def test_stop_string_in_byte_fallback_text(tok):
    ids = encode(tok, "price:") + byte_tokens(tok, "€") + cont(tok, "5 end")
    deltas, detok = stream(tok, ids, stop=["€5"])
    assert "".join(deltas) == "price:" and detok.finished_by_stop == "€5"


def test_random_streams_with_stop_strings_equal_cut_decode(tok):
    rng = random.Random(7)
    words = ["alpha", " beta", " gamma", "\n", " STOP", "ST", "OP", " é", "!!"]
    for _ in range(200):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        ids = encode(tok, text)
        full = tok.decode(ids, skip_special_tokens=True)
        stops = ["STOP", "!!\n"]
        deltas, detok = stream(tok, ids, (rng.randint(1, 3),), stop=stops)
        cut = min([i for i in (full.find(s) for s in stops) if i >= 0], default=len(full))
        assert "".join(deltas) == detok.output_text == full[:cut]
        assert (detok.finished_by_stop is not None) == (cut < len(full))


# -- cost -----------------------------------------------------------------------------------


class CountingTokenizer:
    """Wraps a Tokenizer, counting the ids each decode call receives."""

    def __init__(self, tok):
        self._tok = tok
        self.byte_fallback_ids = tok.byte_fallback_ids
        self.decoded_ids = 0

    def decode(self, ids, skip_special_tokens=False):
        self.decoded_ids += len(ids)
        return self._tok.decode(ids, skip_special_tokens)

    def is_special(self, token_id):
        return self._tok.is_special(token_id)


def test_work_per_update_is_constant(tok):
    ids = encode(tok, "The quick brown fox jumps over the lazy dog. 世界 " * 200)
    counting = CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting, [], stop=["never appears"])
    for token_id in ids:
        detok.update([token_id])
    detok.flush()
    assert detok.output_text == tok.decode(ids)
    assert counting.decoded_ids < 8 * len(ids)
