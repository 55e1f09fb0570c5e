"""Tokenizer: token ids and text exactly as transformers gives them for the same folder."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from caldera.engine.tokenizer import Tokenizer, read_special_tokens_map

transformers = pytest.importorskip("transformers")

TEXTS = [
    "",
    " ",
    "Hello world",
    "  two  spaces\n\nand newlines\n",
    "USER: <image>\nWhat is shown in this image? ASSISTANT:",
    "[INST] <image>\n<image>\nCompare. [/INST]",
    "a<image>b<image><image>c",
    "héllo naïve café 世界 日本語 한국어 😀🎉 \u200b \t tab",
    "<s>already a bos</s> and <pad> and <unk>",
    "\U0001f9ec rare emoji and ❄︎ variation selector",
]


def copy_tokenizer_files(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "config.json",
    ):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def pair(llava15_dir):
    return Tokenizer.from_model_dir(llava15_dir), transformers.AutoTokenizer.from_pretrained(
        llava15_dir
    )


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(pair, text):
    ours, ref = pair
    assert ours.encode(text) == ref(text).input_ids
    assert (
        ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids
    )


def test_bos_added_once(pair):
    ours, _ = pair
    ids = ours.encode("USER: hi ASSISTANT:")
    assert ids[0] == ours.bos_token_id == 1
    assert ids.count(1) == 1


def test_decode_matches_transformers_on_random_ids(pair):
    ours, ref = pair
    rng = random.Random(0)
    special = [0, 1, 2, 32000, 32001]
    byte_ids = sorted(ours.byte_fallback_ids)
    for _ in range(200):
        ids = [
            rng.choice((rng.randrange(32002), rng.choice(special), rng.choice(byte_ids)))
            for _ in range(rng.randint(0, 30))
        ]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            )
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)


def test_round_trip(pair):
    ours, _ = pair
    for text in TEXTS:
        if not text.startswith(" "):  # sentencepiece decoding drops one leading space
            assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


def test_special_token_ids(tiny_checkpoints):
    for path in tiny_checkpoints.values():
        tok = Tokenizer.from_model_dir(path)
        assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
        assert tok.pad_token_id == 32001
        assert tok.image_token_id == 32000
        assert tok.vocab_size == len(tok) == 32002
        assert tok.all_special_ids == [0, 1, 2, 32000, 32001]
        assert tok.special_tokens_map == {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
        }
        assert tok.convert_ids_to_tokens(32000) == "<image>"
        assert tok.convert_tokens_to_ids(["<pad>", "<0x0A>"]) == [32001, 13]
        assert len(tok.byte_fallback_ids) == 256


def test_all_special_ids_are_what_decode_skips(pair):
    ours, ref = pair
    for token_id in range(32002):
        if (
            ours.decode([token_id], skip_special_tokens=True) == ""
            and ours.decode([token_id]) != ""
        ):
            assert ours.is_special(token_id), token_id
    assert set(ref.all_special_ids) <= set(ours.all_special_ids)


def test_missing_tokenizer_json_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_model_dir(tmp_path)


def test_out_of_range_id(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.convert_ids_to_tokens([40000])


def test_add_bos_token_flags_are_honoured(llava15_dir, tmp_path):
    """Explicit add_bos_token / add_eos_token in tokenizer_config.json rebuild the
    post-processor, as transformers 4.x's LlamaTokenizerFast does at load time."""
    folder = copy_tokenizer_files(llava15_dir, tmp_path / "tok")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(add_bos_token=False, add_eos_token=True)
    config_path.write_text(json.dumps(config))
    ours = Tokenizer.from_model_dir(folder)
    for text in ("hello there", "<image>\nx"):
        assert ours.encode(text) == ours.encode(text, add_special_tokens=False) + [2]


def test_special_tokens_as_added_token_dicts(llava15_dir, tmp_path):
    """Older tokenizer_config files write AddedToken objects; special_tokens_map.json wins."""
    folder = copy_tokenizer_files(llava15_dir, tmp_path / "tok")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["bos_token"] = {"__type": "AddedToken", "content": "<s>", "lstrip": False}
    config["pad_token"] = None
    config_path.write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": {"content": "</s>"}, "pad_token": "<unk>"})
    )
    assert read_special_tokens_map(folder) == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
    }
    tok = Tokenizer.from_model_dir(folder)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
