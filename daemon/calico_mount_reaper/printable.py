r"""Text that is safe to show: every character a terminal or a log reader could misread, escaped.

Mount points come from whoever made the mount, so they may hold anything but NUL and '/':
- C0 controls and DEL: a newline forges a second log line, ESC starts a terminal sequence;
- C1 controls (U+0080..U+009F): on a terminal that takes 8-bit controls, 0x9b is CSI;
- bytes that are not valid UTF-8: they arrive as surrogate escapes (U+DC80..U+DCFF, see
  ``os.fsdecode``) and would go out raw, or crash a strict encoder;
- other characters Python does not call printable: format characters such as the bidi
  overrides (U+202E turns the rest of a line around), line and paragraph separators, unassigned
  and private-use code points.

Two spellings, one rule (`str.isprintable`, plus the surrogates):
- `display_path` for a path in a table column: octal like mountinfo's (``\040`` for a space,
  ``\134`` for a backslash, a raw byte as its own octal value), so a path is one token and
  reads the way ``/proc/self/mountinfo`` shows it;
- `log_text` for a log or journal message: ``\n``, ``\t``, ``\xNN`` (raw bytes and controls
  below U+0100), ``\uNNNN`` above; spaces and backslashes stay.

JSON output does not use these: it keeps the exact path (``ensure_ascii`` escapes it).
"""

from __future__ import annotations

_SURROGATE_ESCAPES = range(0xDC80, 0xDD00)


def _code(char: str) -> int:
    """The byte a surrogate escape stands for, else the code point."""
    code = ord(char)
    return code - 0xDC00 if code in _SURROGATE_ESCAPES else code


def display_path(path: str) -> str:
    """A path as one printable token: whitespace, backslash and every non-printable escaped."""
    if path.isprintable() and " " not in path and "\\" not in path:
        return path  # the common case, checked at C speed
    return "".join(
        c if c.isprintable() and c not in " \\" else _octal_or_unicode(_code(c)) for c in path
    )


def _octal_or_unicode(code: int) -> str:
    return f"\\{code:03o}" if code < 0x100 else _unicode(code)


def _unicode(code: int) -> str:
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def log_text(text: str) -> str:
    """A message as one printable line: controls, raw bytes and non-printables escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _log_escape(c) for c in text)


def _log_escape(char: str) -> str:
    if char == "\n":
        return "\\n"
    if char == "\t":
        return "\\t"
    code = _code(char)
    return f"\\x{code:02x}" if code < 0x100 else _unicode(code)
