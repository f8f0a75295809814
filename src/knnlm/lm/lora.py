"""LoRA on the paper's target modules (Appendix C.1), and merging it back for saving."""

from __future__ import annotations

from typing import Any

from torch import nn

from knnlm.errors import KnnlmError

# The paper's LoRA setup for Mistral (Appendix C.1): r=8, alpha=16, dropout 0.05 on the
# embeddings, the q/k/v/o projections and all MLP projections. GPT-2 fuses q/k/v into c_attn;
# c_proj names both the attention output and the MLP down projection.
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc", "wte"],
    "llama": [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "embed_tokens",
    ],
}
LORA_TARGETS["mistral"] = LORA_TARGETS["qwen2"] = LORA_TARGETS["llama"]
LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}


def apply_lora(model: nn.Module, **overrides: Any) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (paper setup: r=8, alpha=16, dropout 0.05)."""
    from peft import LoraConfig, get_peft_model

    model_type = model.config.model_type
    if model_type not in LORA_TARGETS:
        raise KnnlmError(
            f"no LoRA target modules known for {model_type!r}; supported: "
            + ", ".join(LORA_TARGETS)
        )
    # peft matches module names, so a removed last MLP simply contributes no targets.
    targets = list(LORA_TARGETS[model_type])
    settings = {**LORA_DEFAULTS, **overrides}
    config = LoraConfig(
        target_modules=targets,
        # GPT-2's Conv1D stores weights transposed.
        fan_in_fan_out=model_type == "gpt2",
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
