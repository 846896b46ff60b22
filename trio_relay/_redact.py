"""What the relay may show of text it did not write itself: :func:`shown`.

Every string that a client (or a Redis URL, or an exception about either) supplies and
that reaches a log line, an HTTP error body or an error frame goes through :func:`shown`
first, so that no client can start a log line of its own (a newline in a JWT header, say)
and no token or password is ever written out.
"""

from __future__ import annotations

import re

__all__ = ["MAX_SHOWN", "REDACTED", "redact", "shown"]

MAX_SHOWN = 256
"""Most characters :func:`shown` gives of any one value."""

REDACTED = "<redacted>"
"""What stands in for a secret that was cut out."""

_SECRETS = re.compile(
    # A query parameter that carries a secret: ?token=..., &password=...
    # A value in angle brackets is a placeholder, not a secret: "Bearer <token>" in a
    # message, or "?token=<redacted>" redacted before (which keeps its next character).
    r"(?P<name>\b\w*(?:token|password|secret)=)(?!<)[^&\s'\"#;\\]+"
    # An Authorization header's credentials.
    r"|(?P<scheme>\b(?:Bearer|Basic)\s+)(?!<)[^\s'\"\\]+"
    # The password of a URL's user information: redis://:PASSWORD@host, rediss://u:P@h.
    r"|(?P<userinfo>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^/\s]*(?=@)"
    # A JWT anywhere (its header always starts with '{"', base64url "eyJ"), or a piece of one.
    r"|eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){0,2}",
    re.IGNORECASE,
)


def _replace(match: re.Match[str]) -> str:
    return (match["name"] or match["scheme"] or match["userinfo"] or "") + REDACTED


def redact(text: str) -> str:
    """``text`` with every token, credential and URL password replaced by ``<redacted>``:
    the values of query parameters whose name ends in ``token``, ``password`` or
    ``secret``, what follows ``Bearer`` or ``Basic``, the password in
    ``scheme://user:password@host``, and anything shaped like a JWT."""
    return _SECRETS.sub(_replace, text)


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """``value`` as the relay may show it in a log line or an error: secrets redacted
    (:func:`redact`), every character that is not printable (newlines, carriage returns,
    terminal escape sequences, U+2028...) written as its backslash escape as ``repr``
    writes it, and at most ``limit`` characters, the rest cut with a note of the length.

    Backslashes are left alone: a client may write ``\\n`` as two characters, but it
    cannot end the line. Applying it twice changes nothing.
    """
    text = str(value)
    length = len(text)
    text = redact(text[: 4 * limit])  # bound the work; what is beyond is cut anyway
    if not text.isprintable():
        text = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    if len(text) > limit:
        note = f"... ({length} characters)"
        text = text[: max(limit - len(note), 0)] + note
    return text
