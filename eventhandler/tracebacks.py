"""Traceback text for DLQ rows, cheap enough for a failure storm."""

from __future__ import annotations

import functools
import linecache

from eventhandler.db import error_text


def format_traceback(exc: BaseException) -> str:
    """The usual traceback text, without the column carets Python 3.11 computes by parsing every
    frame's source: a storm of bad input would pay that per message (benchmarks/README.md)."""
    text = ""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = []
        tb = current.__traceback__
        while tb is not None:  # walked by hand: traceback.extract_tb computes column positions too
            code = tb.tb_frame.f_code
            frames.append((code.co_filename, tb.tb_lineno, code.co_name))
            tb = tb.tb_next
        stack = _stack_text(tuple(frames)) if len(frames) <= 64 else _stack_text.__wrapped__(tuple(frames))
        text = f"{stack}{type(current).__qualname__}: {error_text(current)}\n{text}"
        if current.__cause__ is not None:
            text = _CAUSE + text
            current = current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            text = _CONTEXT + text
            current = current.__context__
        else:
            current = None
    return text.strip()


@functools.lru_cache(maxsize=1024)  # a storm fails the same way at the same places (deep stacks: uncached)
def _stack_text(frames: tuple[tuple[str, int, str], ...]) -> str:
    lines = ["Traceback (most recent call last):\n"]
    for filename, line, name in frames:
        lines.append(f'  File "{filename}", line {line}, in {name}\n')
        source = linecache.getline(filename, line).strip()
        if source:
            lines.append(f"    {source}\n")
    return "".join(lines)


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"
