"""Generation mode: continue a text with the kNN-LM greedily, one token per step, keeping at
each step what was retrieved (the neighbours and the three distributions of that step)."""

from __future__ import annotations

import numpy as np

from knnlm.errors import KnnlmError
from knnlm.inspect.token_view import distributions, token_details
from knnlm.inspect.view import Inspector, ViewSettings

MAX_STEPS = 32
STEP_NEIGHBOURS = 5  # neighbours kept per step in the steps list


def continue_text(insp: Inspector, ids: np.ndarray, s: ViewSettings, steps: int) -> dict:
    """Up to ``steps`` tokens, each the mixture's likeliest next token at ``s``; stops at the
    end-of-text token or the server's token bound. Returns the steps and the new text's view.

    Each step scores the text with a placeholder after it: its last row's key and logits are
    those of the position after the text (the placeholder itself is never read).
    """
    insp.check(s)
    if not 1 <= steps <= MAX_STEPS:
        raise KnnlmError(f"steps must be in [1, {MAX_STEPS}], got {steps}")
    start, record = len(ids), []
    eos = insp.lm.tokenizer.eos_token_id
    for step in range(steps):
        if len(ids) >= insp.max_tokens:
            break
        rows = insp.score(np.append(ids, 0))
        m = insp.mixed(rows, s)
        j = len(rows.lm) - 1
        chosen = int(distributions(insp, rows, m, s, j)["mix"].argmax())
        d = token_details(insp, rows, m, s, j, target=chosen)
        record.append({"step": step + 1, "id": chosen, "token": d["target"]["token"],
                       "probs": d["probs"], "searched": d["searched"],
                       "neighbours": d["neighbours"][:STEP_NEIGHBOURS]})  # fmt: skip
        ids = np.append(ids, chosen)
        if chosen == eos:
            break
    decode = insp.lm.tokenizer.decode
    return {
        "text": decode(ids.tolist()),
        "continuation": decode(ids[start:].tolist()),
        "steps": record,
        "view": insp.view(ids, s),
    }
