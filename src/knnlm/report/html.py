"""A self-contained HTML page from the report's Markdown (figures embedded as data URIs)."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from markdown_it import MarkdownIt

from knnlm.errors import KnnlmError
from knnlm.fileio import write_text_atomic

_MIME = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".svg": "image/svg+xml",
}

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; line-height: 1.5;
       max-width: 60em; margin: 2em auto; padding: 0 1em; color: #222; }
h1, h2, h3 { line-height: 1.25; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .95em; }
th, td { border: 1px solid #ccc; padding: .3em .7em; }
th { background: #f3f3f3; }
tbody tr:nth-child(even) { background: #fafafa; }
td { font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: 1em 0; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; }
pre code { background: none; padding: 0; }
"""


def _data_uri(src: str, base_dir: Path) -> str:
    """The image at ``src`` (relative to ``base_dir``) as a base64 data URI."""
    if src.startswith("data:"):
        return src
    parts = urlsplit(src)
    if parts.scheme or parts.netloc:
        raise KnnlmError(f"the report must be self-contained, but it links image {src!r}")
    file = base_dir / unquote(parts.path)
    mime = _MIME.get(file.suffix.lower())
    if mime is None:
        raise KnnlmError(f"cannot embed image {src!r}: unknown image type {file.suffix!r}")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise KnnlmError(f"cannot embed image {src!r}: {e.strerror} ({file})") from None
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def markdown_to_html(md_text: str, base_dir: str | os.PathLike, title: str) -> str:
    """Render ``md_text`` (CommonMark + pipe tables) to one HTML page with no external files.

    Images are read from paths relative to ``base_dir`` and embedded as data URIs; a missing
    or remote image is an error rather than a broken page. Raw HTML in the Markdown is
    escaped, so the page cannot pull in anything from elsewhere.
    """
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(md_text)
    base = Path(base_dir)
    for tok in tokens:
        for child in tok.children or ():
            if child.type == "image":
                child.attrSet("src", _data_uri(str(child.attrGet("src") or ""), base))
    body = md.renderer.render(tokens, md.options, {})
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n{body}</body>\n</html>\n"
    )


def write_report(out_dir: str | os.PathLike, md_text: str, title: str) -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` into ``out_dir``.

    Figure paths in the Markdown are relative to ``out_dir``. The HTML is rendered before
    anything is written, so a missing figure leaves no partial report behind.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = markdown_to_html(md_text, out, title)
    md_path, html_path = out / "report.md", out / "report.html"
    write_text_atomic(md_path, md_text)
    write_text_atomic(html_path, page)
    return md_path, html_path
