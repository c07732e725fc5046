"""``cryosieve.io.text``: bytes that are not UTF-8 read as text and written back byte for byte."""

from __future__ import annotations

import os

import pytest

from cryosieve.io.text import EscapeClash, decode_text, encode_text, os_text


def test_every_byte_that_is_not_utf8_comes_back() -> None:
    data = "é∑ ok\n".encode() + bytes(range(0x80, 0x100)) + b"\xc3(\xe2\x82" + "ü".encode()
    text = decode_text(data)
    assert text.startswith("é∑ ok\n") and text.endswith("ü")
    assert encode_text(text) == data
    assert os.fsencode(os_text(text)) == data  # a file name opens the file of those bytes
    assert text.encode("utf-8")  # plain text for every table and text library
    assert encode_text("plain é") == "plain é".encode() and os_text("plain é") == "plain é"


def test_text_holding_the_escape_range_is_refused() -> None:
    with pytest.raises(EscapeClash, match="private use"):
        decode_text(b"\xff" + chr(0x10FEE9).encode())
