"""How many tokens a prompt takes in the model's text encoder, and the part the encoder never reads.

CLIP text encoders read `model_max_length` (77) tokens: a start token, 75 of text and an end token; diffusers cuts
the rest. SDXL's two tokenizers share that limit, so the first one counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .logs import shorten


@dataclass
class PromptTokens:
    count: int  # tokens of text (start and end tokens not counted)
    limit: int  # tokens of text the encoder reads
    cut: str  # the text past the limit, as the tokenizer reads it back ("" when it fits)

    @property
    def over(self) -> bool:
        return self.count > self.limit


def count_tokens(tokenizer: Any, text: str) -> PromptTokens:
    """Count `text` with a CLIP-style tokenizer (one start and one end token around the text)."""
    ids = tokenizer(text or "", truncation=False).input_ids[1:-1]
    limit = int(tokenizer.model_max_length) - 2
    return PromptTokens(count=len(ids), limit=limit, cut=tokenizer.decode(ids[limit:]) if len(ids) > limit else "")


def tokens_markdown(prompt: PromptTokens, negative: PromptTokens) -> str:
    """The line under the prompts: each one's token count against the limit and, when over, what is cut."""
    parts = []
    for what, t in (("Prompt", prompt), ("Negative", negative)):
        if t.over:  # the cut in a code span, so the user's text shows as typed
            cut = shorten(t.cut, 120).replace("`", "'")
            parts.append(f"{what}: **{t.count} / {t.limit} tokens — cut after {t.limit}:** `{cut}`")
        else:
            parts.append(f"{what}: {t.count} / {t.limit} tokens")
    return " · ".join(parts)
