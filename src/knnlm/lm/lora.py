"""LoRA on the paper's target modules (Appendix C.1), and merging it back for saving."""

from __future__ import annotations

from typing import Any

from torch import nn

from knnlm.errors import KnnlmError
from knnlm.lm.adapters import family_of, registered_model_types

# The paper's LoRA setup for Mistral (Appendix C.1): r=8, alpha=16, dropout 0.05; the target
# modules of each family are in its registry entry (``knnlm.register_family``).
LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}


def apply_lora(model: nn.Module, **overrides: Any) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (paper setup: r=8, alpha=16, dropout 0.05)."""
    from peft import LoraConfig, get_peft_model

    model_type = model.config.model_type
    family = family_of(model_type)
    if family is None or not family.lora_targets:
        known = [t for t in registered_model_types() if family_of(t).lora_targets]
        raise KnnlmError(
            f"no LoRA target modules known for {model_type!r}; supported: {', '.join(known)} "
            "(add others with knnlm.register_family(..., lora_targets=[...]))"
        )
    # peft matches module names, so a removed last MLP simply contributes no targets.
    targets = list(family.lora_targets)
    settings = {**LORA_DEFAULTS, **overrides}
    config = LoraConfig(
        target_modules=targets,
        fan_in_fan_out=family.lora_fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
        **settings,
    )
    return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into the base weights; a plain model is returned unchanged.

    With tied input/output embeddings, LoRA on the input embedding trains W + BA for the
    input while the output keeps W; merging into the shared tensor would change the output
    too, so the output embedding is untied and keeps W.
    """
    if not hasattr(model, "merge_and_unload"):
        return model
    base = model.get_base_model()
    out_emb = base.get_output_embeddings()
    in_emb = base.get_input_embeddings()
    keep = None
    if out_emb is not None and out_emb.weight.data_ptr() == in_emb.weight.data_ptr():
        keep = out_emb.weight.detach().clone()
    merged = model.merge_and_unload()
    if keep is not None:
        merged.get_output_embeddings().weight = nn.Parameter(keep)
        merged.config.tie_word_embeddings = False
    return merged


def lora_targets(model_type: str) -> list[str] | None:
    """The LoRA target modules registered for ``model_type`` (None when it has none)."""
    family = family_of(model_type)
    return list(family.lora_targets) if family is not None and family.lora_targets else None
