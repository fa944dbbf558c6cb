"""containerd's filter language (``pkg/filters``), as its List and Walk calls send it.

A filter string is selectors joined by ``,`` (all must match); several strings match if any
does. A selector is ``fieldpath[op value]``: a field path of names (``[A-Za-z0-9_]+``) or
double-quoted parts joined by ``.``, then ``==``, ``!=`` or ``~=`` (a regular expression,
which may also be quoted ``/.../`` or ``|...|``) and a value, bare (up to ``,`` or a space) or
quoted with Go's escapes. Without an operator it tests the field's presence.

    labels."containerd.io/snapshot.ref"==sha256:abc,parent!=""

The quirks of containerd's scanner are kept, since the same strings must mean the same:
spaces may come before a token but not after the last one, a bare value cannot start with
``.``, and ``\\xNN`` escapes are bytes (decoded as UTF-8, raw bytes surrogate-escaped).
One deviation: regular expressions are Python's (Go's RE2 differs at the edges), compiled while
parsing, so one that does not compile is refused (containerd logs it and matches nothing).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fastpull import errors
from fastpull.errors import SnapshotInvalid

Lookup = Callable[[tuple[str, ...]], str | None]
"""A field path's value in the object being matched, or None where it has no such field."""

_OPERATORS = ("==", "!=", "~=")
_QUOTES = '"/|'
# Go's unicode.IsSpace: Latin-1 spaces, then the White_Space property.
_SPACES = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {chr(c) for c in range(0x2000, 0x200B)}
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}


@dataclass(frozen=True)
class Selector:
    """One ``fieldpath[op value]``; ``op`` is ``""`` for a presence test."""

    fieldpath: tuple[str, ...]
    op: str = ""
    value: str = ""
    pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def match(self, lookup: Lookup) -> bool:
        found = lookup(self.fieldpath)
        if self.op == "":
            return found is not None
        if self.op == "==":
            return found == self.value
        if self.op == "!=":
            return (found or "") != self.value
        assert self.pattern is not None
        return self.pattern.search(found or "") is not None


@dataclass(frozen=True)
class Filter:
    """Alternatives (any may match), each a conjunction of selectors (all must match)."""

    alternatives: tuple[tuple[Selector, ...], ...]

    def match(self, lookup: Lookup) -> bool:
        return any(all(s.match(lookup) for s in conjunction) for conjunction in self.alternatives)


def parse_all(filters: Sequence[str]) -> Filter:
    """Parse a List/Walk call's filters; none (or an empty one) matches everything.
    SnapshotInvalid for a malformed one."""
    if not filters:
        return Filter(((),))
    return Filter(tuple(_Parser(f).filter() for f in filters))


def quote(value: str) -> str:
    """``value`` as a double-quoted filter value or field that parses back to it."""
    out = []
    for c in value:
        if c in '"\\':
            out.append("\\" + c)
        elif c < " " or c == "\x7f":
            out.append(f"\\x{ord(c):02x}")
        elif c == "\ufffd":  # Go's scanner takes a literal one for a decoding error
            out.append("\\ufffd")
        elif "\ud800" <= c <= "\udfff":
            raise ValueError(f"a filter cannot hold the lone surrogate {c!r}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


class _Parser:
    """Recursive descent over a scanner with containerd's tokens and one character of lookahead."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.value_mode = False  # after an operator: the next bare token is a value

    def filter(self) -> tuple[Selector, ...]:
        if self.text == "":
            return ()
        selectors = [self.selector()]
        while (c := self.peek()) == ",":
            self.pos += 1
            self.value_mode = False
            selectors.append(self.selector())
        if c is not None:
            raise self.error(self.pos, "unexpected input")
        return tuple(selectors)

    def selector(self) -> Selector:
        fieldpath = self.fieldpath()
        if self.peek() in (",", None):
            return Selector(fieldpath)
        start, kind, text = self.scan()
        if kind != "operator":
            raise self.error(start, 'expected an operator ("=="|"!="|"~=")')
        if text not in _OPERATORS:
            raise self.error(start, f"unsupported operator {text!r}")
        start, kind, token = self.scan()
        if kind == "value":
            value = token
        elif kind == "quoted":
            value = self.unquote(start, token, alternative_quotes=text == "~=")
        else:
            raise self.error(start, "expected value or quoted")
        if text != "~=":
            return Selector(fieldpath, text, value)
        try:
            pattern = re.compile(value)
        except (re.error, OverflowError, RecursionError) as e:
            raise self.error(start, f"bad regular expression: {e}") from None
        return Selector(fieldpath, text, value, pattern)

    def fieldpath(self) -> tuple[str, ...]:
        parts = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            self.value_mode = False
            parts.append(self.field())
        return tuple(parts)

    def field(self) -> str:
        start, kind, text = self.scan()
        if kind == "field":
            return text
        if kind == "quoted":
            return self.unquote(start, text, alternative_quotes=False)
        raise self.error(start, "expected field or quoted")

    # The scanner.

    def peek(self) -> str | None:
        """The next character, unconsumed (spaces included); None at the end. An illegal one
        (NUL, a lone surrogate, U+FFFD: Go's decoding error) ends the parse."""
        if self.pos >= len(self.text):
            return None
        c = self.text[self.pos]
        if c == "\0" or c == "\ufffd" or "\ud800" <= c <= "\udfff":
            raise self.error(self.pos, "illegal character")
        return c

    def scan(self) -> tuple[int, str, str]:
        """The next token after any spaces: ``(start, kind, text)``, kind one of field, value,
        quoted, operator, separator, end, or other (one character no rule takes)."""
        while (c := self.peek()) is not None and c in _SPACES:
            self.pos += 1
        start = self.pos
        if c is None:
            return start, "end", ""
        if c in _QUOTES:
            self.scan_quoted(c)
            return start, "quoted", self.text[start : self.pos]
        self.pos += 1
        if c in ",.":
            self.value_mode = False
            return start, "separator", c
        if c in "=!~":
            self.skip_while(lambda c: c in "=!~")
            self.value_mode = True
            return start, "operator", self.text[start : self.pos]
        if self.value_mode:  # the first character is taken whatever it is, as Go's scanner does
            self.skip_while(_is_value_char)
            self.value_mode = False
            return start, "value", self.text[start : self.pos]
        if _is_field_char(c):
            self.skip_while(_is_field_char)
            return start, "field", self.text[start : self.pos]
        return start, "other", c

    def skip_while(self, accept: Callable[[str], bool]) -> None:
        while (c := self.peek()) is not None and accept(c):
            self.pos += 1

    def scan_quoted(self, quote: str) -> None:
        """Consume a quoted token, checking its escapes as Go's scanner does."""
        start = self.pos
        self.pos += 1
        while (c := self.peek()) != quote:
            if c is None or c == "\n":
                raise self.error(start, "quoted literal not terminated")
            self.pos += 1
            if c != "\\":
                continue
            c = self.peek()
            if c is not None and (c in _SIMPLE_ESCAPES or c == quote):
                self.pos += 1
            elif c is not None and c in "01234567":
                self.digits(8, 3)
            elif c is not None and c in _HEX_DIGITS:
                self.pos += 1
                self.digits(16, _HEX_DIGITS[c])
            else:
                raise self.error(self.pos - 1, "illegal escape sequence")
        self.pos += 1

    def digits(self, base: int, count: int) -> None:
        for _ in range(count):
            c = self.peek()
            if c is None or not _is_digit(c, base):
                raise self.error(self.pos, "illegal numeric escape sequence")
            self.pos += 1

    def unquote(self, start: int, token: str, *, alternative_quotes: bool) -> str:
        """A quoted token's value (Go's ``strconv.Unquote``, with ``/`` and ``|`` quotes allowed
        where ``alternative_quotes``)."""
        quote = token[0]
        if quote != '"' and not alternative_quotes:
            raise self.error(start, "invalid quote encountered")
        out = bytearray()
        body = token[1:-1]
        i = 0
        while i < len(body):
            c = body[i]
            i += 1
            if c != "\\":
                out += c.encode()
                continue
            c = body[i]
            i += 1
            if c in _SIMPLE_ESCAPES:
                out += _SIMPLE_ESCAPES[c].encode()
            elif c in "'\"|/":
                if c != quote:
                    raise self.error(start, f"unquoting failed: \\{c} in a {quote}-quoted string")
                out += c.encode()
            elif c in _HEX_DIGITS:
                n = _HEX_DIGITS[c]
                code = int(body[i : i + n], 16)
                i += n
                if c == "x":
                    out.append(code)
                elif code > 0x10FFFF:
                    raise self.error(start, f"unquoting failed: \\{c}{body[i - n : i]} is past U+10FFFF")
                else:  # a surrogate encodes as U+FFFD, as Go's utf8.EncodeRune does
                    out += (chr(code) if not 0xD800 <= code <= 0xDFFF else "\ufffd").encode()
            else:  # three octal digits, checked by the scanner
                code = int(body[i - 1 : i + 2], 8)
                i += 2
                if code > 255:
                    raise self.error(start, f"unquoting failed: \\{body[i - 3 : i]} is past \\377")
                out.append(code)
        return out.decode("utf-8", "surrogateescape")

    def error(self, pos: int, why: str) -> SnapshotInvalid:
        return SnapshotInvalid(None, f"invalid filter {errors.quote(self.text)}: {why} at offset {pos}")


def _is_field_char(c: str) -> bool:
    return c == "_" or ("a" <= c <= "z") or ("A" <= c <= "Z") or ("0" <= c <= "9")


def _is_value_char(c: str) -> bool:
    # Go's: not ',' nor a space, and graphic (a letter, mark, number, punctuation or symbol).
    return c != "," and c not in _SPACES and c.isprintable()


def _is_digit(c: str, base: int) -> bool:
    return c in ("01234567" if base == 8 else "0123456789abcdefABCDEF")
