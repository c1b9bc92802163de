"""Run reports: a Markdown file with relative image links and a self-contained HTML twin (images embedded)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path


class Report:
    """Collects sections (headings, paragraphs, tables, images, code) and writes ``.md`` and ``.html``."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple[str, object]] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def table(self, header: list[str], rows: list[list[object]]) -> None:
        self.blocks.append(("table", (header, [[_fmt(c) for c in row] for row in rows])))

    def image(self, path: str | Path, caption: str) -> None:
        if Path(path).is_file():
            self.blocks.append(("image", (Path(path), caption)))

    def code(self, text: str, lang: str = "") -> None:
        self.blocks.append(("code", (lang, text)))

    def to_markdown(self, base: Path) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                out += ["#" * level + " " + text, ""]
            elif kind == "paragraph":
                out += [value, ""]
            elif kind == "table":
                header, rows = value
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
                out.append("")
            elif kind == "image":
                path, caption = value
                rel = _relative(path, base)
                out += [f"![{caption}]({rel})", ""]
            elif kind == "code":
                lang, text = value
                out += [f"```{lang}", text.rstrip(), "```", ""]
        return "\n".join(out)

    def to_html(self) -> str:
        parts = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                parts.append(f"<h{level}>{html.escape(text)}</h{level}>")
            elif kind == "paragraph":
                parts.append(f"<p>{_inline(value)}</p>")
            elif kind == "table":
                header, rows = value
                head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
                body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "image":
                path, caption = value
                data = base64.b64encode(path.read_bytes()).decode()
                parts.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            elif kind == "code":
                _, text = value
                parts.append(f"<pre><code>{html.escape(text.rstrip())}</code></pre>")
        style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
                 "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;"
                 "text-align:left;vertical-align:top}pre{background:#f5f5f5;padding:.8rem;overflow-x:auto;"
                 "white-space:pre-wrap}img{max-width:100%}code{font-family:ui-monospace,monospace}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")

    def write(self, md_path: str | Path, html_path: str | Path) -> None:
        md_path, html_path = Path(md_path), Path(html_path)
        md_path.write_text(self.to_markdown(md_path.parent), encoding="utf-8")
        html_path.write_text(self.to_html(), encoding="utf-8")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def _inline(text: str) -> str:
    """Escape, then render `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
