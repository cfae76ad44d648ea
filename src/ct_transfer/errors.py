"""User-facing errors: the CLI prints the message on one line and exits 2."""

from __future__ import annotations

import re

# "<_io.BytesIO object at 0x7f...>" and similar: internals a user cannot act on
_REPR = re.compile(r"<[^<>]*? (?:object )?at 0x[0-9a-fA-F]+>")


class CTTransferError(Exception):
    """An input or option problem the user can fix; the message names the file or option."""


class ConfigError(CTTransferError, ValueError):
    """A bad parameter value. The library says ``lr=nan: ...``; the CLI says ``--lr nan: ...``."""

    def __init__(self, param: str, value, why: str):
        self.param, self.value, self.why = param, value, why
        super().__init__(f"{param}={show(value)}: {why}")

    def as_flag(self) -> str:
        return f"--{self.param.replace('_', '-')} {show(self.value)}: {self.why}"


def first_line(exc: BaseException, limit: int = 160) -> str:
    """A short, single-line reason from any exception (never cut mid-word, no object reprs)."""
    text = clean(str(exc)) or type(exc).__name__
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " …"
    return text


def clean(text: str) -> str:
    """One line, object reprs (``<_io.BytesIO object at 0x...>``) replaced by ``input``."""
    return " ".join(_REPR.sub("input", str(text)).split())


def show(value, limit: int = 80) -> str:
    """A user's value in a message: one line, at most ``limit`` characters (then "…")."""
    text = clean(value) if value != "" else "''"
    return text if len(text) <= limit else text[:limit] + "…"
