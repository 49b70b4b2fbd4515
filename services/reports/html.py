"""A self-contained HTML page from dosebench's Markdown reports: inline CSS, images as data URIs.

The Markdown that dosebench writes is simple, so a small converter covers it: headings, paragraphs,
``**bold**``, ``*italic*``, ```code```, bullet lists, pipe tables (with ``:---``/``---:`` alignment) and
images. An image is written ``![caption](name.png)``; a paragraph that is only ``name.png`` is shown
as that image too. Images whose name is not in ``images`` stay as their caption text (with the name), so
the page never points outside itself.
"""

from __future__ import annotations

import base64
import html
import re

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1d2430; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #d0d7de; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #d0d7de; padding: .25em .6em; }
th { background: #f3f5f8; }
tr:nth-child(even) td { background: #fafbfc; }
code { background: #f3f5f8; padding: 0 .25em; border-radius: 3px; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #e1e4e8; }
figcaption { font-size: .9em; color: #57606a; }
"""

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_BARE_IMAGE = re.compile(r"^[\w.\-]+\.png$")
_BULLET = re.compile(r"^[-*]\s+")


def _inline(text: str) -> str:
    """Escape, then apply code, bold and italic spans (code first, so its content is left alone)."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if len(part) >= 2 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        escaped = html.escape(part, quote=False)
        escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
        escaped = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<em>\1</em>", escaped)
        out.append(escaped)
    return "".join(out)


def _figure(name: str, caption: str, images: dict[str, bytes]) -> str:
    data = images.get(name)
    if data is None:
        return f"<p>{_inline(caption or name)} ({html.escape(name)}: not available)</p>"
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    alt = html.escape(caption or name)
    caption_html = f"<figcaption>{_inline(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{alt}" data-name="{html.escape(name)}">{caption_html}</figure>'


def _cells(line: str) -> list[str]:
    stripped = line.strip()
    if stripped.startswith("|"):
        stripped = stripped[1:]
    if stripped.endswith("|"):
        stripped = stripped[:-1]
    return [cell.strip() for cell in stripped.split("|")]


def _is_separator(line: str) -> bool:
    cells = _cells(line)
    return bool(cells) and all(re.fullmatch(r":?-{1,}:?", c) for c in cells)


def _table(lines: list[str]) -> str:
    header = _cells(lines[0])
    aligns = []
    for cell in _cells(lines[1]):
        if cell.startswith(":") and cell.endswith(":"):
            aligns.append("center")
        elif cell.endswith(":"):
            aligns.append("right")
        else:
            aligns.append("left")

    def style(i: int) -> str:
        return f' style="text-align:{aligns[i]}"' if i < len(aligns) else ""

    out = ["<table>", "<thead><tr>" + "".join(f"<th{style(i)}>{_inline(c)}</th>" for i, c in enumerate(header))
           + "</tr></thead>", "<tbody>"]
    for line in lines[2:]:
        out.append("<tr>" + "".join(f"<td{style(i)}>{_inline(c)}</td>" for i, c in enumerate(_cells(line)))
                   + "</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def markdown_to_html(markdown_text: str, images: dict[str, bytes] | None = None) -> str:
    """The body HTML of ``markdown_text`` (the subset described in the module docstring).

    Parameters
    ----------
    markdown_text : str
        Markdown source.
    images : dict[str, bytes], optional
        PNG bytes by the file name the Markdown refers to.

    Returns
    -------
    str
        HTML fragment (no ``<html>`` wrapper).
    """
    images = images or {}
    lines = markdown_text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            i += 1
            continue
        heading = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if heading:
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
            i += 1
            continue
        if stripped.startswith("|") and i + 1 < len(lines) and _is_separator(lines[i + 1]):
            block = [line, lines[i + 1]]
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table(block))
            continue
        if _BULLET.match(stripped):
            items = []
            while i < len(lines) and _BULLET.match(lines[i].strip()):
                items.append("<li>" + _inline(_BULLET.sub("", lines[i].strip(), count=1)) + "</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        image = _IMAGE.fullmatch(stripped)
        if image:
            out.append(_figure(image.group(2), image.group(1), images))
            i += 1
            continue
        if _BARE_IMAGE.fullmatch(stripped) and stripped in images:
            out.append(_figure(stripped, "", images))
            i += 1
            continue
        paragraph = [stripped]
        i += 1
        while i < len(lines):
            nxt = lines[i].strip()
            if not nxt or nxt.startswith(("#", "|", "- ", "* ")) or _IMAGE.fullmatch(nxt):
                break
            paragraph.append(nxt)
            i += 1
        text = " ".join(paragraph)
        # an image inside running text: keep the text, show the figure after the paragraph
        inline_images = _IMAGE.findall(text)
        text = _IMAGE.sub(lambda m: m.group(1) or m.group(2), text)
        out.append(f"<p>{_inline(text)}</p>")
        out.extend(_figure(name, caption, images) for caption, name in inline_images)
    return "\n".join(out)


def render_html(title: str, markdown_text: str, images: dict[str, bytes]) -> str:
    """A self-contained HTML page: the Markdown rendered, CSS inline, PNGs embedded as data URIs.

    Parameters
    ----------
    title : str
        The page's ``<title>``.
    markdown_text : str
        The report in Markdown (tables become HTML tables; ``![caption](name.png)`` or a paragraph that
        is just ``name.png`` shows that image inline).
    images : dict[str, bytes]
        PNG bytes by file name.

    Returns
    -------
    str
        A complete HTML document that loads nothing from elsewhere.
    """
    body = markdown_to_html(markdown_text, images)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
