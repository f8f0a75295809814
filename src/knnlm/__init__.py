"""knnlm: nearest-neighbour language models and the analyses of Chiang et al. (NAACL 2024).

Example::

    from knnlm import KnnLM, Datastore
    knn_lm = KnnLM.from_pretrained("gpt2")
    ds = Datastore.build(knn_lm, ["some text", "more text"], "runs/ds")
    print(knn_lm.perplexity(["other text"], ds, k=8))

The public names are resolved on first use, so ``import knnlm`` (and the CLI) stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "KnnLM": "knnlm.api",
    "PerplexityResult": "knnlm.api",
    "Datastore": "knnlm.retrieval.datastore",
    "KnnLogitsProcessor": "knnlm.generation",
    "Family": "knnlm.lm.adapters",
    "register_family": "knnlm.lm.adapters",
    "registered_model_types": "knnlm.lm.adapters",
    "KnnlmError": "knnlm.errors",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'knnlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
