"""knnlm: nearest-neighbour language models and the analyses of Chiang et al. (NAACL 2024)."""

__version__ = "0.1.0"

from knnlm.errors import KnnlmError  # noqa: E402

__all__ = ["KnnlmError", "__version__"]
