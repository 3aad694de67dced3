"""The character vocabulary: the unknown-character rule, decoding, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.records.vocab import Vocab, normalize_newlines


def test_from_text_is_sorted_and_unique():
    vocab = Vocab.from_text("banana\n")
    assert vocab.chars == ["\n", "a", "b", "n"]
    assert len(vocab) == 4 and "a" in vocab and "z" not in vocab


def test_encode_decode_round_trip():
    vocab = Vocab.from_text("hello world\n")
    encoded = vocab.encode("hello\nworld")
    assert encoded.dropped == 0
    assert encoded.ids.dtype == np.int32
    assert vocab.decode(encoded.ids) == "hello\nworld"


def test_accented_character_becomes_its_base_form():
    vocab = Vocab.from_text("cafe ")
    encoded = vocab.encode("café")
    assert vocab.decode(encoded.ids) == "cafe"
    assert encoded.dropped == 0


def test_ligature_becomes_its_first_letter():
    vocab = Vocab.from_text("fix")
    assert vocab.decode(vocab.encode("\ufb01x").ids) == "fx"  # ﬁ decomposes to "fi"; its base is "f"


def test_unknown_characters_are_dropped_and_counted():
    vocab = Vocab.from_text("abc ")
    encoded = vocab.encode("a€b 漢c")
    assert vocab.decode(encoded.ids) == "ab c"
    assert encoded.dropped == 2


def test_accented_character_without_base_in_vocab_is_dropped():
    vocab = Vocab.from_text("xyz")
    encoded = vocab.encode("é")
    assert len(encoded.ids) == 0 and encoded.dropped == 1


def test_newlines_are_normalized_before_encoding():
    vocab = Vocab.from_text("ab\n")
    encoded = vocab.encode("a\r\nb\rb")
    assert vocab.decode(encoded.ids) == "a\nb\nb"
    assert encoded.dropped == 0
    assert normalize_newlines("x\r\n\r\ny\r") == "x\n\ny\n"


def test_encode_exact_refuses_unknown_characters():
    vocab = Vocab.from_text("ab")
    assert vocab.encode_exact("abba").tolist() == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="'c' is not in the vocabulary"):
        vocab.encode_exact("abc")


def test_json_round_trip_keeps_order_and_non_ascii():
    vocab = Vocab(["z", "é", "\n", "a"])
    text = vocab.to_json()
    assert "é" in text  # stored as UTF-8, readable
    again = Vocab.from_json(text)
    assert again.chars == vocab.chars


@pytest.mark.parametrize("chars, problem", [
    ([], "at least one character"),
    (["a", "a"], "duplicate"),
    (["ab"], "single characters"),
    ([1], "single characters"),
    (["a", "b", "\ud800"], r"entry 2 is '\\ud800', a lone surrogate"),  # which no UTF-8 text holds, nor can encode
    (["\udfff"], r"entry 0 is '\\udfff', a lone surrogate"),
])
def test_invalid_vocabularies_are_refused(chars, problem):
    with pytest.raises(ValueError, match=problem):
        Vocab(chars)


@pytest.mark.parametrize("text", ["[1, 2]", '{"characters": ["a"]}', '{"chars": "ab"}', "not json"])
def test_from_json_refuses_other_shapes(text):
    with pytest.raises(ValueError):
        Vocab.from_json(text)


@pytest.mark.parametrize("text, problem", [
    ("not json", "not valid JSON: Expecting value: line 1 column 1"),
    ("", "not valid JSON: Expecting value"),
    ('{"chars": ["a"', "not valid JSON: Expecting"),
    ("[" * 200_000, "not valid JSON: nested too deeply"),  # json's parser runs out of recursion
    ('{"chars": ["a", "\\ud800"]}', "entry 1 is '\\ud800', a lone surrogate"),  # the JSON escape of one
])
def test_from_json_says_what_is_wrong(text, problem):
    with pytest.raises(ValueError) as e:
        Vocab.from_json(text)
    assert problem in str(e.value)


def test_json_is_plain_data():
    assert json.loads(Vocab.from_text("ab").to_json()) == {"chars": ["a", "b"]}
