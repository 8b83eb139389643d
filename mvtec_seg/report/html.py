"""`report.html`: the same content as `report.md` on one self-contained page (no server, no network).

Why from the Markdown: the report's text, tables and figure list are written once (`tables.markdown`);
this renders that known subset (headings, paragraphs, lists, GitHub tables, images, `**bold**`,
`` `code` ``) and embeds every local PNG as a base64 data URI, so the file can be mailed or opened from
anywhere. An image that cannot be read keeps its relative link.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)]+)\)$")
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1400px;
       padding: 0 1.5rem; color: #1d1d1f; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #e4e4e4; padding-bottom: .2rem; }
h3 { margin-top: 1.6rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #d0d0d0; padding: .25rem .6rem; }
th { background: #f2f2f2; max-width: 24rem; overflow-wrap: anywhere; }  /* long cell labels wrap */
tr:nth-child(even) td { background: #fafafa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: .5rem 0 1rem; border: 1px solid #eee; }
code { background: #f3f3f3; padding: 0 .25rem; border-radius: 3px; font-size: .88em; }
.wrap { overflow-x: auto; }
"""


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _data_uri(src: str, base: Path) -> str:
    """A local PNG as a data URI (self-contained page); anything else stays a link."""
    path = Path(src) if Path(src).is_absolute() else base / src
    if path.suffix.lower() != ".png" or not path.is_file():
        return src
    try:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return src


def _cells(line: str) -> list[str]:
    """'| a | b\\|c |' -> ['a', 'b|c'] (Markdown's escaped pipe)."""
    parts = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [p.strip().replace("\\|", "|") for p in parts]


def _table(lines: list[str]) -> str:
    header, align, body = _cells(lines[0]), _cells(lines[1]), [_cells(x) for x in lines[2:]]
    right = [a.endswith(":") and not a.startswith(":") for a in align]

    def row(cells: list[str], tag: str) -> str:
        return (
            "<tr>"
            + "".join(
                f"<{tag}{' class=num' if i < len(right) and right[i] else ''}>{_inline(c)}</{tag}>"
                for i, c in enumerate(cells)
            )
            + "</tr>"
        )

    rows = [row(header, "th"), *[row(r, "td") for r in body]]
    return '<div class="wrap"><table>\n' + "\n".join(rows) + "\n</table></div>"


def markdown_to_html(text: str, base: Path, title: str = "MVTec AD segmentation report") -> str:
    """Render the report's Markdown subset as one HTML page; images relative to `base` are embedded."""
    blocks: list[str] = []
    para: list[str] = []
    items: list[str] = []

    def flush() -> None:
        if para:
            blocks.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()
        if items:
            blocks.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            flush()
        elif line.startswith("#"):
            flush()
            level = len(line) - len(line.lstrip("#"))
            blocks.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            flush()
            table = []
            while i < len(lines) and lines[i].startswith("|"):
                table.append(lines[i])
                i += 1
            blocks.append(_table(table))
            continue
        elif m := _IMAGE.match(line.strip()):
            flush()
            alt = html.escape(m["alt"])
            blocks.append(f'<img src="{_data_uri(m["src"], base)}" alt="{alt}" title="{alt}">')
        elif line.startswith("- "):
            if para:
                flush()
            items.append(line[2:])
        else:
            if items:
                flush()
            para.append(line.strip())
        i += 1
    flush()
    body = "\n".join(blocks)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
