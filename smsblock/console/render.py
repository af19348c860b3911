"""The one rendering helper of the console: every value goes through :func:`html`.

:class:`Markup` marks text that is already HTML (the output of :func:`html` itself);
everything else - VM names, paths, descriptions, status messages, form input - is
escaped with :func:`html.escape` (quotes included) when it is put into a template.  So a
VM named ``<img src=x onerror=alert(1)>`` shows as text, wherever it is shown.
"""

from __future__ import annotations

import html as _html
from datetime import datetime, timezone
from typing import Iterable


class Markup(str):
    """Text that is HTML already (made by :func:`html` or :func:`join`)."""

    __slots__ = ()

    def __add__(self, other) -> "Markup":      # Markup + text stays HTML, the text escaped
        return Markup(str.__add__(self, esc(other)))

    def __radd__(self, other) -> "Markup":
        return Markup(str.__add__(esc(other), self))


def esc(value) -> Markup:
    """``value`` as HTML: Markup unchanged, None as empty, anything else escaped."""
    if isinstance(value, Markup):
        return value
    if value is None:
        return Markup("")
    return Markup(_html.escape(str(value), quote=True))


def html(template: str, *args, **kwargs) -> Markup:
    """``template.format(...)`` with every argument escaped (Markup arguments kept)."""
    return Markup(template.format(*(esc(a) for a in args),
                                  **{k: esc(v) for k, v in kwargs.items()}))


def join(parts: Iterable, sep: str = "") -> Markup:
    return Markup(sep.join(esc(p) for p in parts))


def when(epoch: float | None) -> Markup:
    """A time as ``<time>``: UTC in the page, the browser's local time after console.js."""
    if epoch is None:
        return html('<span class="muted">-</span>')
    dt = datetime.fromtimestamp(float(epoch), tz=timezone.utc)
    return html('<time datetime="{}">{}</time>', dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
                dt.strftime("%Y-%m-%d %H:%M UTC"))


def badge(value: str | None) -> Markup:
    """A state or status as a coloured label (the class is derived from a fixed set)."""
    if value is None:
        return html('<span class="muted">-</span>')
    kind = {"HEALTHY": "ok", "AVAILABLE": "ok", "COMPLETED": "ok", "ACTIVE": "run",
            "IMPORTING": "run", "PENDING": "wait", "UNHEALTHY": "bad", "FAILED": "bad",
            "FAILING": "bad", "PAUSED_ON_FAILURE": "bad", "DELETING": "wait",
            "DELETED": "muted", "MISSED": "wait", "EXPIRED": "bad",
            "NOT_IMPORTED": "muted", "error": "bad", "warning": "wait",
            "info": "muted"}.get(str(value), "muted")
    return html('<span class="badge badge-{}">{}</span>', kind, value)


def table(headers: list, rows: list[list], *, caption: str | None = None,
          row_ids: list[str | None] | None = None, empty: str = "Nothing to show.") -> Markup:
    """A table; cells are escaped unless Markup.  ``row_ids`` set an id on each row."""
    head = join(html('<th scope="col">{}</th>', h) for h in headers)
    body = []
    for i, row in enumerate(rows):
        rid = row_ids[i] if row_ids else None
        cells = join(html("<td>{}</td>", c) for c in row)
        body.append(html('<tr id="{}">{}</tr>', rid, cells) if rid else html("<tr>{}</tr>", cells))
    if not rows:
        body.append(html('<tr><td colspan="{}" class="muted">{}</td></tr>', len(headers), empty))
    cap = html("<caption>{}</caption>", caption) if caption else Markup("")
    return html('<div class="scroll"><table>{}<thead><tr>{}</tr></thead><tbody>{}</tbody>'
                '</table></div>', cap, head, join(body))


def field_error(errors: dict, name: str) -> Markup:
    """The error of form field ``name``, next to the field (and tied to it for screen readers)."""
    message = errors.get(name)
    if not message:
        return Markup("")
    return html('<p class="field-error" id="err-{}" role="alert">{}</p>', name, message)


def invalid_attr(errors: dict, name: str) -> Markup:
    return (html(' aria-invalid="true" aria-describedby="err-{}"', name) if errors.get(name)
            else Markup(""))
