"""The settings of one datastore build (:class:`DatastoreSettings`), checked once where they
are built; :func:`knnlm.retrieval.datastore_build.make_datastore` takes them whole and
meta.json records them whole (``settings.datastore``)."""

from __future__ import annotations

from dataclasses import dataclass

from knnlm.forward_pass import WindowSettings
from knnlm.lm.adapters import KEY_TYPES
from knnlm.settings import Settings, require

KEY_DTYPE_NAMES = ("float16", "float32")


@dataclass(frozen=True)
class DatastoreSettings(Settings):
    """Every setting of one datastore build (``knnlm datastore build``): the ``split`` scored,
    its windows (None filled from the model), ``batch_size`` windows a forward pass, what a
    key is (``key_type``) and how it is stored (``key_dtype``), the text column of an ``hf:``
    corpus, and a progress record every ``checkpoint_every`` batches (a rerun resumes there).
    Example: ``DatastoreSettings("train", WindowSettings(1024, 512), key_dtype="float32")``.
    """

    split: str = "train"
    window: WindowSettings = WindowSettings(1024, 1024)
    batch_size: int = 8
    key_type: str = "ffn_input"
    key_dtype: str = "float16"
    text_field: str = "text"
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        require(self.key_type in KEY_TYPES, "key_type",
                f"must be one of {', '.join(KEY_TYPES)}, got {self.key_type!r}")  # fmt: skip
        require(self.key_dtype in KEY_DTYPE_NAMES, "key_dtype",
                f"must be float16 or float32, got {self.key_dtype!r}")  # fmt: skip
        for name in ("batch_size", "checkpoint_every"):
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
            require(ok, name, f"must be at least 1, got {v!r}")
