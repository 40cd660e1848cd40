"""Markdown as safe HTML for loralab's pages: the subset examples.md and model answers use.

examples.md is written by the eval stage (``examples_markdown``): headings, **bold** labels and each answer as
a blockquote; the answers themselves are model output and may hold any Markdown or HTML. Everything is
escaped; only the constructs below become elements: ATX headings, blockquotes, fenced code, bullet and
numbered lists, rules, paragraphs, `code`, **strong** and *emphasis*. A line break inside a paragraph stays
a line break (model answers are often poems or steps). Links, images and raw HTML stay text: a
``javascript:`` link would run under this page's script policy. Not a library: loralab's runtime
dependencies have none, and the page needs only this.
"""

from __future__ import annotations

import re

from loralab.reporting.html import esc

_MD_MAX_DEPTH = 16  # blockquotes and lists nested deeper than this are shown as text, not recursed into
_MD_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_MD_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_MD_RULE = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_MD_QUOTE = re.compile(r"^ {0,3}> ?(.*)$")
_MD_ITEM = re.compile(r"^( {0,3})([-*+]|\d{1,9}[.)])([ \t]+|$)(.*)$")
_MD_INLINE = re.compile(
    r"(?P<code>(?P<ticks>`+)(?P<body>.+?)(?<!`)(?P=ticks)(?!`))"
    r"|\\(?P<escaped>[!-/:-@\[-`{-~])"
    r"|\*\*(?=\S)(?P<strong>.+?)(?<=\S)\*\*"
    r"|(?<!\w)__(?=\S)(?P<strong2>.+?)(?<=\S)__(?!\w)"
    r"|\*(?=[^\s*])(?P<em>.+?)(?<=[^\s*])\*"
    r"|(?<!\w)_(?=[^\s_])(?P<em2>.+?)(?<=[^\s_])_(?!\w)",
    re.DOTALL,
)


def markdown(text: str, heading_offset: int = 0) -> str:
    """``text`` (Markdown, untrusted) as HTML: the subset above as elements, everything else escaped.
    ``heading_offset`` moves headings down (1: ``#`` becomes ``<h2>``) to nest them under the page's own."""
    return "\n".join(block for _, block in _md_blocks(text.expandtabs(4).splitlines(), heading_offset, 0))


def markdown_inline(text: str) -> str:
    """One line of Markdown (untrusted) as HTML: `code`, **strong** and *emphasis*; everything else escaped."""
    out, last = [], 0
    for m in _MD_INLINE.finditer(text):
        out.append(esc(text[last:m.start()]))
        last = m.end()
        if m["code"]:
            out.append(f"<code>{esc(m['body'].strip() or m['body'])}</code>")
        elif m["escaped"]:
            out.append(esc(m["escaped"]))
        elif m["strong"] or m["strong2"]:
            out.append(f"<strong>{markdown_inline(m['strong'] or m['strong2'])}</strong>")
        else:
            out.append(f"<em>{markdown_inline(m['em'] or m['em2'])}</em>")
    out.append(esc(text[last:]))
    return "".join(out)


def _md_starts_block(line: str) -> bool:
    """Whether ``line`` ends a paragraph by starting another block."""
    return bool(_MD_FENCE.match(line) or _MD_HEADING.match(line) or _MD_RULE.match(line)
                or _MD_QUOTE.match(line) or _MD_ITEM.match(line) and _MD_ITEM.match(line)[4].strip())


def _md_blocks(lines: list[str], offset: int, depth: int) -> list[tuple[str, str]]:
    """The blocks of ``lines`` as ``(kind, html)`` pairs, kind one of p, h, pre, hr, quote, list."""
    blocks, i, n = [], 0, len(lines)
    while i < n:
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := _MD_FENCE.match(line):
            fence, indent = m[1], len(line) - len(line.lstrip(" "))
            i, body = i + 1, []
            while i < n and not re.match(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", lines[i]):
                body.append(re.sub(rf"^ {{0,{indent}}}", "", lines[i]))
                i += 1
            i += 1  # the closing fence (or the end of the text)
            language = m[2].strip().split(" ")[0]
            cls = f' class="language-{esc(language)}"' if language and fence[0] == "`" else ""
            blocks.append(("pre", f"<pre><code{cls}>{esc(chr(10).join(body))}</code></pre>"))
        elif m := _MD_HEADING.match(line):
            level = min(len(m[1]) + offset, 6)
            blocks.append(("h", f"<h{level}>{markdown_inline(m[2] or '')}</h{level}>"))
            i += 1
        elif _MD_RULE.match(line):
            blocks.append(("hr", "<hr>"))
            i += 1
        elif _MD_QUOTE.match(line) and depth < _MD_MAX_DEPTH:
            body = []
            while i < n and (m := _MD_QUOTE.match(lines[i])):
                body.append(m[1])
                i += 1
            inner = "\n".join(b for _, b in _md_blocks(body, offset, depth + 1))
            blocks.append(("quote", f"<blockquote>\n{inner}\n</blockquote>"))
        elif _MD_ITEM.match(line) and depth < _MD_MAX_DEPTH:
            html_list, i = _md_list(lines, i, offset, depth)
            blocks.append(("list", html_list))
        else:
            body = [line.strip()]
            i += 1
            while i < n and lines[i].strip() and not (_md_starts_block(lines[i]) and depth < _MD_MAX_DEPTH):
                body.append(lines[i].strip())
                i += 1
            blocks.append(("p", "<p>" + markdown_inline("\n".join(body)).replace("\n", "<br>\n") + "</p>"))
    return blocks


def _md_list(lines: list[str], i: int, offset: int, depth: int) -> tuple[str, int]:
    """The list starting at ``lines[i]``: its HTML and the index after it. An item holds the lines indented
    to its text (and unindented continuation lines); a blank line ends the list unless the list goes on,
    and another marker (``-`` after ``*``, ``1)`` after ``1.``) starts another list."""
    first = _MD_ITEM.match(lines[i])
    marker = first[2][-1]  # the bullet, or the number's delimiter
    bodies, loose, n = [], False, len(lines)
    while i < n and (m := _MD_ITEM.match(lines[i])) and m[2][-1] == marker:
        width = len(m[1]) + len(m[2]) + (len(m[3]) if m[4] and len(m[3]) <= 4 else 1)
        body = [m[4]]
        bodies.append(body)
        i += 1
        while i < n:
            line = lines[i]
            if not line.strip():
                after = next((j for j in range(i + 1, n) if lines[j].strip()), n)
                nxt = lines[after] if after < n else ""
                same_list = (im := _MD_ITEM.match(nxt)) and im[2][-1] == marker and len(im[1]) < width
                if not (same_list or nxt.strip() and len(nxt) - len(nxt.lstrip(" ")) >= width):
                    return _md_list_html(first, bodies, loose, offset, depth), i
                loose = True
                if same_list:
                    i = after
                    break
                body.append("")
                i += 1
            elif len(line) - len(line.lstrip(" ")) >= width:
                body.append(line[width:])
                i += 1
            elif not _md_starts_block(line):
                body.append(line.strip())  # a continuation line that is not indented
                i += 1
            else:
                break
    return _md_list_html(first, bodies, loose, offset, depth), i


def _md_list_html(first: re.Match, bodies: list[list[str]], loose: bool, offset: int, depth: int) -> str:
    items = []
    for body in bodies:
        blocks = _md_blocks(body, offset, depth + 1)
        items.append("<li>" + "\n".join(b[3:-4] if kind == "p" and not loose else b for kind, b in blocks) + "</li>")
    ordered = first[2][0].isdigit()
    start = int(first[2][:-1]) if ordered else 1
    start_attr = f' start="{start}"' if start != 1 else ""
    tag = "ol" if ordered else "ul"
    return f"<{tag}{start_attr}>\n" + "\n".join(items) + f"\n</{tag}>"


# ---------------------------------------------------------------------------------------------------
# Tables
