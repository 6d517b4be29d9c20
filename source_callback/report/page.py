"""HTML building blocks of the report, and the self-contained page that holds them."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

#: Nothing outside the page may load: images are data URIs, the style is inline, no scripts.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 2em; } h3 { font-size: 1.05em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; vertical-align: middle; }
th { background: #f3f3f3; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
img.figure { max-width: 100%; }
img.example { height: 48px; image-rendering: pixelated; vertical-align: middle; }
.side-by-side { display: flex; flex-wrap: wrap; gap: 2em; }
.text { font-family: ui-monospace, monospace; font-size: 0.85em; white-space: pre-wrap; }
.warning { color: #a40; }
.note { color: #666; font-size: 0.9em; }
"""


@dataclass(frozen=True)
class Section:
    """A part of the page: its ``id`` (linked from the top), heading and HTML content."""

    anchor: str
    title: str
    parts: Sequence[str]


def png_image(png: bytes, alt: str, css_class: str = "figure") -> str:
    """An ``<img>`` showing PNG bytes embedded as a base64 data URI.

    Parameters
    ----------
    png
        The PNG file's bytes.
    alt
        Alternative text.
    css_class
        ``figure`` (scaled to the page's width) or ``example`` (a small, pixelated thumbnail).

    Returns
    -------
    str
        The HTML element.

    """
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{css_class}" src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()
) -> str:
    """An HTML table.

    Parameters
    ----------
    headers
        Column titles, as text (escaped here); none for a table without a header row.
    rows
        Cells as HTML fragments: escape text with :func:`html.escape` first.
    numeric
        Indices of the columns to right-align.

    Returns
    -------
    str
        The ``<table>`` element.

    Examples
    --------
    >>> print(table(["n"], [["<b>1</b>"]], numeric=[0]))
    <table><tr><th>n</th></tr>
    <tr><td class="number"><b>1</b></td></tr></table>

    """
    head = ["<tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr>"] if headers else []
    body = [
        "<tr>"
        + "".join(
            f'<td class="number">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    ]
    return "<table>" + "\n".join([*head, *body]) + "</table>"


def paragraph(text: str, css_class: str | None = None) -> str:
    """A paragraph of text (escaped), optionally of a CSS class (``warning``, ``note``)."""
    attribute = f' class="{css_class}"' if css_class else ""
    return f"<p{attribute}>{escape(text)}</p>"


def document(title: str, sections: Sequence[Section]) -> str:
    """The complete page: inline style, and a content security policy that forbids any load.

    Parameters
    ----------
    title
        Page title and top heading (text).
    sections
        The sections, in order; the page starts with links to them.

    Returns
    -------
    str
        A self-contained HTML5 document.

    """
    links = " ".join(f'<a href="#{s.anchor}">{escape(s.title)}</a>' for s in sections)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head>',
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">',
            f"<title>{escape(title)}</title>",
            f"<style>{_STYLE}</style>",
            "</head><body>",
            f"<h1>{escape(title)}</h1>",
            f"<nav>{links}</nav>",
            *(
                f'<section id="{s.anchor}"><h2>{escape(s.title)}</h2>\n'
                + "\n".join(s.parts)
                + "</section>"
                for s in sections
            ),
            "</body></html>",
            "",
        ]
    )
