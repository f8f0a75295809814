"""The page for one text at fixed settings as one self-contained HTML file: the stylesheet,
the script and every number inline (each token's neighbours and distributions precomputed),
no server and nothing fetched. The script is the live page's, which only draws."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from knnlm.fileio import write_text_atomic
from knnlm.inspect.view import Inspector, ViewSettings


def asset(name: str) -> str:
    """A file of the page shipped in the package (``assets/``)."""
    return files("knnlm.inspect").joinpath("assets", name).read_text(encoding="utf-8")


def static_data(insp: Inspector, text: str, s: ViewSettings) -> dict:
    """Everything the static page shows: the config, the text, its view and every token's
    details."""
    ids = insp.encode(text)
    with insp.busy:
        view = insp.static_view(ids, s)
    details = view.pop("details")
    return {"config": insp.config(), "text": text, "view": view, "details": details}


def render_static(data: dict | list[dict], title: str = "knnlm inspect") -> str:
    """The HTML page of one or several texts' :func:`static_data` (a list: one after the
    other, chosen from a menu)."""
    pages = data if isinstance(data, list) else [data]
    payload = json.dumps({"static": pages}, separators=(",", ":"), allow_nan=False)
    payload = payload.replace("<", "\\u003c")  # nothing in it can close the script element
    head = f"<style>{asset('page.css')}</style>"
    scripts = (
        f'<script id="knnlm-data" type="application/json">{payload}</script>'
        f"<script>{asset('page.js')}</script>"
    )
    html = asset("page.html").replace("<!--HEAD-->", head).replace("<!--SCRIPTS-->", scripts)
    # The first text's figure in the HTML itself, so the page shows it even without scripts.
    figure = pages[0]["view"]["figure"] if pages else ""
    html = html.replace('<div id="figure"></div>', f'<div id="figure">{figure}</div>')
    return html.replace("<title>knnlm inspect</title>", f"<title>{_escape(title)}</title>")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_static(
    insp: Inspector, texts: list[tuple[str, str]], s: ViewSettings, out: str | Path
) -> Path:
    """Write the static page of ``texts`` ((label, text) pairs) at settings ``s`` to ``out``
    (atomically)."""
    insp.check(s)
    pages = [static_data(insp, text, s) | {"label": label} for label, text in texts]
    write_text_atomic(out, render_static(pages))
    return Path(out)
