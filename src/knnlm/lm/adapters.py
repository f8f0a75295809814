"""Architecture adapters: the paper's split p_lm = f(g(enc(c))) for each model family.

For every supported family the last transformer block computes
``out = h + mlp(norm2(h))`` where ``h`` is the residual stream after the block's attention.
The paper (Eq. 1) names the pieces:

- ``enc(c) = h``                              (input of g)
- ``g(h)   = h + mlp(norm2(h))``              (last MLP with its residual)
- ``f(z)   = softmax(lm_head(final_norm(z)))`` (last linear layer with softmax)

Key types for the datastore:

- ``ffn_input``    = norm2(h), the input of the last MLP (Khandelwal et al., default)
- ``block_input``  = h itself, the residual stream that enters g
- ``final_hidden`` = final_norm(g(h)), the input of lm_head

Keys are captured with forward hooks on the norm modules, so the model's own forward runs
unchanged and the hooks cost nothing but a reference to tensors it computes anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from knnlm.errors import KnnlmError

KEY_TYPES = ("ffn_input", "block_input", "final_hidden")

# Config fields that bound the positions a model can read (learned tables, or the length a
# rotary model was configured for; the first one present wins).
POSITION_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")


def position_limit(model: torch.nn.Module) -> tuple[int, str] | None:
    """(limit, config field) of the longest sequence ``model`` accepts, or None when unknown."""
    config = getattr(model, "config", None)
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None


@dataclass(frozen=True)
class Family:
    """Attribute paths of one architecture family, and the modules LoRA adapts in it.

    Example (what ``register_family`` stores for GPT-2)::

        Family(("gpt2",), "transformer.h", "ln_2", "mlp", "transformer.ln_f", "lm_head",
               lora_targets=("c_attn", "c_proj", "c_fc", "wte"), lora_fan_in_fan_out=True)
    """

    model_types: tuple[str, ...]
    blocks: str  # dotted path from the CausalLM to the list of blocks
    norm2: str  # attribute of a block: the norm before the MLP
    mlp: str  # attribute of a block: the MLP
    final_norm: str  # dotted path from the CausalLM to the final norm
    lm_head: str  # dotted path from the CausalLM to the output projection
    lora_targets: tuple[str, ...] = ()  # module names peft adapts (empty: LoRA refused)
    lora_fan_in_fan_out: bool = False  # weights stored transposed (GPT-2's Conv1D)


_REGISTRY: dict[str, Family] = {}


def register_family(
    model_types: str | tuple[str, ...] | list[str],
    *,
    blocks: str,
    norm2: str,
    mlp: str,
    final_norm: str,
    lm_head: str = "lm_head",
    lora_targets: tuple[str, ...] | list[str] = (),
    lora_fan_in_fan_out: bool = False,
) -> Family:
    """Teach knnlm a model family: where enc / g / f and the key hooks live, and LoRA's targets.

    Plain LM perplexity works for any causal LM; datastores, the projection, the MLP memory
    and LoRA need the family registered. A model type registered again is replaced.

    Example (OLMo, laid out as Llama; tests/test_api.py checks this registration)::

        import knnlm
        knnlm.register_family("olmo", blocks="model.layers", norm2="post_attention_layernorm",
                              mlp="mlp", final_norm="model.norm",
                              lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    """
    types = (model_types,) if isinstance(model_types, str) else tuple(model_types)
    family = Family(
        types, blocks, norm2, mlp, final_norm, lm_head, tuple(lora_targets), lora_fan_in_fan_out
    )
    for t in types:
        _REGISTRY[t] = family
    return family


def unregister_family(model_type: str) -> None:
    """Forget ``model_type``'s family (e.g. after a test); ``unregister_family("olmo")``."""
    _REGISTRY.pop(model_type, None)


def family_of(model_type: str | None) -> Family | None:
    """The registered family of ``model_type``, or None."""
    return _REGISTRY.get(model_type) if model_type else None


def registered_model_types() -> tuple[str, ...]:
    """Model types with a registered family (``config.model_type`` values).

    Example: ``"llama" in knnlm.registered_model_types()`` is True.
    """
    return tuple(_REGISTRY)


# The paper's LoRA setup (Appendix C.1) adapts the embeddings, the q/k/v/o projections and
# all MLP projections. GPT-2 fuses q/k/v into c_attn; c_proj names both the attention output
# and the MLP down projection.
register_family(
    "gpt2", blocks="transformer.h", norm2="ln_2", mlp="mlp", final_norm="transformer.ln_f",
    lora_targets=("c_attn", "c_proj", "c_fc", "wte"), lora_fan_in_fan_out=True,
)  # fmt: skip
register_family(
    ("llama", "mistral", "qwen2"), blocks="model.layers", norm2="post_attention_layernorm",
    mlp="mlp", final_norm="model.norm",
    lora_targets=(
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        "embed_tokens",
    ),
)  # fmt: skip


def _get(obj: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class ZeroMLP(nn.Module):
    """Stands in for a removed MLP: contributes nothing to the residual stream, owns no parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class Adapter:
    """Exposes enc / g / f and the key hooks of one loaded causal LM.

    Constructing one never fails; what needs the split raises a clear ``KnnlmError`` when
    the model's family is not registered. Example::

        adapter = Adapter(model)
        with adapter.capture() as store:
            model(input_ids)
        keys = store["ffn_input"]
    """

    def __init__(self, model: nn.Module):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        # A peft wrapper keeps the real model one or two levels down.
        base = model
        if hasattr(model, "get_base_model"):
            base = model.get_base_model()
            model_type = base.config.model_type
        self.model = model
        self.base = base
        self._family = family_of(model_type)
        self.model_type = model_type

    @property
    def registered(self) -> bool:
        """Whether the model's family is registered (needed for keys and Eq. 1's split)."""
        return self._family is not None

    @property
    def family(self) -> Family:
        """The registered family; one clear line when the model's family is not registered."""
        if self._family is None:
            raise KnnlmError(
                f"model type {self.model_type!r} is not registered for kNN keys and Eq. 1's "
                f"split (registered: {', '.join(registered_model_types())}); plain LM "
                "perplexity works, the rest needs knnlm.register_family(...)"
            )
        return self._family

    # -- the pieces of Eq. 1 -------------------------------------------------------------
    @property
    def last_block(self) -> nn.Module:
        return _get(self.base, self.family.blocks)[-1]

    @property
    def norm2(self) -> nn.Module:
        return getattr(self.last_block, self.family.norm2)

    @property
    def mlp(self) -> nn.Module:
        return getattr(self.last_block, self.family.mlp)

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.base, self.family.final_norm)

    @property
    def lm_head(self) -> nn.Module:
        if self._family is None:  # any HF causal LM names its output projection
            return self.base.get_output_embeddings()
        return _get(self.base, self.family.lm_head)

    @property
    def hidden_size(self) -> int:
        return int(self.base.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.weight.shape[0])

    def g(self, h: torch.Tensor) -> torch.Tensor:
        """Last MLP with its residual connection: h + mlp(norm2(h))."""
        return h + self.mlp(self.norm2(h))

    def f_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of f: lm_head(final_norm(z)); f itself is their softmax."""
        return self.lm_head(self.final_norm(z))

    def fg_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.f_logits(self.g(h))

    @property
    def output_embedding(self) -> torch.Tensor:
        """W of f, shape (vocab, hidden)."""
        return self.lm_head.weight

    # -- the last MLP (Appendix E) -------------------------------------------------------
    def has_last_mlp(self) -> bool:
        return not isinstance(self.mlp, ZeroMLP)

    def drop_last_mlp(self) -> None:
        """Remove the last block's MLP (its parameters disappear; the residual passes through)."""
        setattr(self.last_block, self.family.mlp, ZeroMLP())
        self.base.config.knnlm_drop_last_mlp = True

    # -- hooks ---------------------------------------------------------------------------
    @contextmanager
    def capture(self) -> Iterator[dict[str, torch.Tensor]]:
        """Within the context, each forward stores ``enc``, ``ffn_input`` and ``final_hidden``.

        ``enc`` (= ``block_input``) is the residual h after the last attention, taken as the
        input of norm2; ``ffn_input`` is norm2's output; ``final_hidden`` is final_norm's output.
        """
        store: dict[str, torch.Tensor] = {}

        def norm2_hook(_mod, args, out):
            store["enc"] = args[0]
            store["ffn_input"] = out

        def final_hook(_mod, _args, out):
            store["final_hidden"] = out

        handles = [
            self.norm2.register_forward_hook(norm2_hook),
            self.final_norm.register_forward_hook(final_hook),
        ]
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def key_from(store: dict[str, torch.Tensor], key_type: str) -> torch.Tensor:
        if key_type not in KEY_TYPES:
            raise KnnlmError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
        return store["enc" if key_type == "block_input" else key_type]


# Relative tolerance of the split check per dtype: max |f(g(enc)) - logits| / max |logits|.
SPLIT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
LOW_PRECISION_TOLERANCE = 1e-2  # bfloat16 / float16


def _module(base: nn.Module, path: str, field: str, model_type: str | None) -> nn.Module:
    try:
        found = _get(base, path)
    except AttributeError:
        found = None
    if not isinstance(found, nn.Module):
        raise KnnlmError(
            f"the family registered for model type {model_type!r} names {field}={path!r}, "
            f"which {type(base).__name__} does not have as a module"
        )
    return found


def _check_modules(adapter: Adapter) -> None:
    fam, mt = adapter.family, adapter.model_type
    blocks = _module(adapter.base, fam.blocks, "blocks", mt)
    if not isinstance(blocks, nn.ModuleList | nn.Sequential) or len(blocks) == 0:
        raise KnnlmError(f"blocks={fam.blocks!r} of model type {mt!r} is not a list of blocks")
    _module(blocks[-1], fam.norm2, "norm2", mt)
    _module(blocks[-1], fam.mlp, "mlp", mt)
    _module(adapter.base, fam.final_norm, "final_norm", mt)
    head = _module(adapter.base, fam.lm_head, "lm_head", mt)
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise KnnlmError(f"lm_head={fam.lm_head!r} of model type {mt!r} has no weight")


@torch.no_grad()
def check_split(model: nn.Module) -> None:
    """Refuse a registered family whose modules are missing, or whose f(g(enc(c))) does not
    reproduce the model's own logits on a few tokens (in the loaded dtype), in one line.

    Checked once per model and family. Example: Gemma2 registered with Llama's layout is
    refused (its MLP output has a norm of its own).
    """
    adapter = Adapter(model)
    param = next(model.parameters())
    key = (adapter.family, param.dtype)
    if getattr(model, "_knnlm_split_checked", None) == key:
        return
    _check_modules(adapter)
    vocab = adapter.vocab_size
    ids = (torch.arange(1, 9, device=param.device) % vocab).unsqueeze(0)
    with adapter.capture() as store:
        logits = model(input_ids=ids).logits.float()
    mt = adapter.model_type
    if "enc" not in store or "final_hidden" not in store:
        raise KnnlmError(
            f"the norm2 / final_norm modules registered for model type {mt!r} are not called "
            "in its forward pass"
        )
    split = adapter.fg_logits(store["enc"]).float()
    err = float((split - logits).abs().max())
    rel = err / max(float(logits.abs().max()), 1e-12)
    tol = SPLIT_TOLERANCE.get(param.dtype, LOW_PRECISION_TOLERANCE)
    if not rel <= tol:
        raise KnnlmError(
            f"the family registered for model type {mt!r} does not reproduce the model's "
            f"logits: max |f(g(enc(c))) - logits| = {err:.3g} ({rel:.2g} of the largest logit, "
            f"tolerance {tol:g} in {str(param.dtype).removeprefix('torch.')}); check its "
            "blocks, norm2, mlp, final_norm and lm_head"
        )
    object.__setattr__(model, "_knnlm_split_checked", key)


def apply_saved_surgery(model: nn.Module) -> None:
    """Re-apply architecture changes recorded in the config (e.g. a removed last MLP)."""
    if getattr(model.config, "knnlm_drop_last_mlp", False):
        Adapter(model).drop_last_mlp()
