"""The page's figure, drawn on the server as inline SVG (no plotting in the page's script, no
image files): the running perplexities of the LM, the kNN-LM (and LM + memory) over the text."""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT, PAD = 640, 170, 34
STYLES = {"lm": ("#6b7280", "LM"), "knnlm": ("#2563eb", "kNN-LM"),
          "lm_memory": ("#d97706", "LM + memory")}  # fmt: skip


def perplexity_svg(curves: dict[str, list[float | None]]) -> str:
    """An SVG of each curve (running perplexity after each target; None where infinite)."""
    values = [v for c in curves.values() for v in c if v is not None]
    n = max((len(c) for c in curves.values()), default=0)
    if not values or n == 0:
        return ""
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0

    def x(i: int) -> float:
        return PAD + (WIDTH - 2 * PAD) * (i / max(n - 1, 1))

    def y(v: float) -> float:
        return HEIGHT - PAD - (HEIGHT - 2 * PAD) * (v - lo) / (hi - lo)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="running perplexity">',
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" stroke="#999"/>',
        f'<text x="2" y="{y(hi) + 4:.1f}" font-size="11">{hi:.4g}</text>',
        f'<text x="2" y="{y(lo) + 4:.1f}" font-size="11">{lo:.4g}</text>',
        f'<text x="{WIDTH / 2:.0f}" y="{HEIGHT - 8}" font-size="11" text-anchor="middle">'
        "target token &#8594; (running perplexity)</text>",
    ]
    for row, (name, curve) in enumerate(curves.items()):
        colour, label = STYLES.get(name, ("#000", name))
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(curve) if v is not None)
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>'
        )
        parts.append(f'<text x="{WIDTH - PAD - 90}" y="{14 + 14 * row}" font-size="12" '
                     f'fill="{colour}">{escape(label)}</text>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)
