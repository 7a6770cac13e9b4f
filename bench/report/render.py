"""Rendering: a report is a list of sections of blocks (tables, paragraphs, lists, figures), each block
rendered once to markdown and once to HTML."""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from emotion_models.atomic import atomic_write_text


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]
    prefix: str = ""  # e.g. "warning:", shown in bold in HTML


@dataclass
class Figure:
    name: str
    path: Path | None  # None: not measured in these results
    caption: str


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_md(block) -> str:
    if isinstance(block, Table):
        return md_table(block.header, block.rows)
    if isinstance(block, Para):
        return block.text
    if isinstance(block, Bullets):
        return "\n".join(f"- {block.prefix + ' ' if block.prefix else ''}{i}" for i in block.items)
    if block.path is None:
        return f"- {block.name.replace('_', ' ')}: not measured in these results"
    return f"![{block.name}]({block.path.name})\n\n{block.caption}"


def to_html(block) -> str:
    if isinstance(block, Table):
        return html_table(block.header, block.rows)
    if isinstance(block, Para):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Bullets):
        pre = f"<b>{html.escape(block.prefix)}</b> " if block.prefix else ""
        return "<ul>" + "".join(f"<li>{pre}{html.escape(i)}</li>" for i in block.items) + "</ul>"
    if block.path is None:
        return f"<p>{html.escape(block.name.replace('_', ' '))}: not measured in these results</p>"
    b64 = base64.b64encode(block.path.read_bytes()).decode()
    return (f"<figure><img src='data:image/png;base64,{b64}' alt='{block.name}'>"
            f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")


_STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;font-size:13px}"
          "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}"
          "th{background:#f2f2f2}tr:nth-child(even) td{background:#fafafa}"
          "td:first-child,th:first-child{text-align:left}p.intro{color:#444}h2{margin-top:1.6em}")


def write(out: Path, title: str, intro: list[str], sections: list[Section], stem: str = "report") -> None:
    """out/<stem>.md and a self-contained out/<stem>.html (figures embedded)."""
    md = [f"# {title}", "", *intro, ""]
    body = []
    for s in sections:
        md += [f"## {s.title}", "", "\n\n".join(to_md(b) for b in s.blocks), ""]
        body.append(f"<h2>{html.escape(s.title)}</h2>" + "".join(to_html(b) for b in s.blocks))
    atomic_write_text(out / f"{stem}.md", "\n".join(md) + "\n")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            + "".join(f"<p class='intro'>{html.escape(line)}</p>" for line in intro) +
            f"{''.join(body)}</body></html>")
    atomic_write_text(out / f"{stem}.html", page)
