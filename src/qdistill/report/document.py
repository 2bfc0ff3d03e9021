"""A report as a list of blocks, rendered twice, to Markdown and to self-contained HTML,
so both show the same numbers.

Blocks: ``("h", level, text)``, ``("p", text)``, ``("ul", [text])``,
``("table", header, rows)``, ``("img", key, alt)``, ``("pre", lang, text)``. Text may hold
inline ``code`` (backticks) and **bold** (double asterisks), nothing else.
"""
from __future__ import annotations

import base64
import html
import re


def _md_cell(s) -> str:
    return str(s).replace("|", "\\|")


def to_markdown(blocks, plot_paths: dict) -> str:
    """Markdown; an image block links ``plot_paths[key]``."""
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2])
        elif kind == "p":
            out.append(b[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in b[1]))
        elif kind == "table":
            header, rows = b[1], b[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
                     "|" + "|".join("---" for _ in header) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{b[2]}]({plot_paths[b[1]]})")
        elif kind == "pre":
            out.append(f"```{b[1]}\n{b[2].rstrip(chr(10))}\n```")
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    s = html.escape(str(text), quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


_CSS = """body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #bbb;padding:0.25em 0.6em;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}img{max-width:100%}
pre{background:#f5f5f5;padding:0.8em;overflow-x:auto}code{background:#f0f0f0}"""


def to_html(blocks, images: dict, title: str) -> str:
    """HTML, self-contained: CSS inline, PNGs as ``data:image/png;base64`` URIs, nothing fetched."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{_inline_html(b[2])}</h{b[1]}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(b[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>"
                           for r in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(images[b[1]]).decode("ascii")
            out.append(f'<p><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}"></p>')
        elif kind == "pre":
            out.append(f"<pre>{html.escape(b[2])}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
