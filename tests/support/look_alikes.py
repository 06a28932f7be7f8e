"""Spellings of text that NFKC folds back to it, for tests of email normalization."""

from __future__ import annotations


def fullwidth(text: str) -> str:
    """`text` with each printable ASCII character as its fullwidth form (U+FF01-U+FF5E)."""
    return "".join(
        chr(ord(character) + 0xFEE0) if "!" <= character <= "~" else character for character in text
    )


def mathematical_bold(text: str) -> str:
    """`text` with each ASCII letter as its MATHEMATICAL BOLD form (U+1D400-U+1D433)."""
    return "".join(
        chr(0x1D400 + ord(character) - ord("A"))
        if "A" <= character <= "Z"
        else chr(0x1D41A + ord(character) - ord("a"))
        if "a" <= character <= "z"
        else character
        for character in text
    )
