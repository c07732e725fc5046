"""Text of files that may hold bytes that are not UTF-8: read, kept and written back byte for byte.

RELION reads and writes the values of a STAR file as bytes; a comment or an optics group name
written in Latin-1 (``Cr\\xe9\\xe9``) is not UTF-8. Such a file is decoded as UTF-8 where it is,
and each byte that is not (``0x80`` to ``0xff``) becomes one character of a private-use range,
``U+10FE80`` to ``U+10FEFF`` (:data:`ESCAPE_BASE` plus the byte), which every table and text
library stores like any other character. :func:`encode_text` gives the bytes back, so a value
written out is the value read; :func:`os_text` gives a file name that the operating system's
calls turn back into the same bytes (Python's ``surrogateescape``). A text that holds
characters of that range itself could not be told apart and is refused (:func:`decode_text`).
"""

from __future__ import annotations

import re

#: The character of byte ``b`` (``0x80 <= b <= 0xff``) that is not UTF-8 is ``chr(ESCAPE_BASE + b)``.
ESCAPE_BASE = 0x10FE00

_ESCAPED = re.compile(f"[{chr(ESCAPE_BASE + 0x80)}-{chr(ESCAPE_BASE + 0xFF)}]")
_TO_PRIVATE = {0xDC00 + byte: ESCAPE_BASE + byte for byte in range(0x80, 0x100)}  # from Python's surrogateescape
_TO_SURROGATE = {private: surrogate for surrogate, private in _TO_PRIVATE.items()}


class EscapeClash(ValueError):
    """A text that already holds characters of the private-use range :func:`decode_text` uses."""


def is_utf8(data: bytes) -> bool:
    """Whether ``data`` is valid UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def decode_text(data: bytes) -> str:
    """``data`` as text: UTF-8, each byte that is not UTF-8 as ``chr(ESCAPE_BASE + byte)``.

    Raises :class:`EscapeClash` when the UTF-8 text itself holds characters of that range.
    """
    text = data.decode("utf-8", "surrogateescape")
    if _ESCAPED.search(text):
        raise EscapeClash(f"holds characters U+{ESCAPE_BASE + 0x80:X} to U+{ESCAPE_BASE + 0xFF:X} (private use), "
                          "which cannot be read beside bytes that are not UTF-8")
    return text.translate(_TO_PRIVATE)


def encode_text(text: str) -> bytes:
    """The bytes of ``text`` as :func:`decode_text` read them (UTF-8, escaped bytes as themselves)."""
    if not _ESCAPED.search(text):
        return text.encode("utf-8")
    return os_text(text).encode("utf-8", "surrogateescape")


def os_text(text: str) -> str:
    """``text`` with each escaped byte as Python's ``surrogateescape`` character, so that a file name
    opens the file whose name holds that byte."""
    return text.translate(_TO_SURROGATE) if _ESCAPED.search(text) else text


def escaped_text(value: str | bytes) -> str:
    """A value from a binary format (bytes, or str) as text in the form of :func:`decode_text`."""
    if isinstance(value, bytes):
        return decode_text(value)
    return str(value)
