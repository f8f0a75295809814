"""The tuner's frontier drawn: perplexity against tok/s, every point, the frontier, the LM's
speed, the default kNN-LM and the pick (``knnlm tune --plot``)."""

from __future__ import annotations

from pathlib import Path

from knnlm.report.drawing import plt, save_pyplot


def plot_frontier(result: dict, out: str | Path) -> Path:
    """Write the PNG of ``knnlm tune``'s result to ``out``."""
    pts = result["points"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter([p["tok_s"] for p in pts], [p["perplexity"] for p in pts], s=10, color="0.7",
               label="measured settings")  # fmt: skip
    front = [pts[i] for i in result["frontier"]]
    ax.plot([p["tok_s"] for p in front], [p["perplexity"] for p in front], "o-", color="C0",
            ms=4, label="frontier")  # fmt: skip
    d, pick, lm = result["default"], result["pick"], result["lm"]
    ax.scatter([d["tok_s"]], [d["perplexity"]], marker="s", color="C1", zorder=3,
               label="default kNN-LM")  # fmt: skip
    ax.scatter([pick["tok_s"]], [pick["perplexity"]], marker="*", s=120, color="C3", zorder=4,
               label="pick")  # fmt: skip
    ax.axvline(lm["tok_s"], color="0.4", ls="--", lw=1)
    ax.axhline(lm["perplexity"], color="0.4", ls=":", lw=1, label="LM (speed, perplexity)")
    ax.set_xlabel("tokens / s (this machine)")
    ax.set_ylabel(f"perplexity ({result['split']})")
    ax.legend(fontsize=8)
    return save_pyplot(fig, out)
