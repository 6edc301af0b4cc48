"""Which tokens stand for images in the graft, and how the LLM's tokenizer learns them.

The stock SmolVLM processor reads four names from the tokenizer (`image_token`, `fake_image_token`,
`global_image_token`, `end_of_utterance_token`, plus `video_token`). When the LLM already reserves vision tokens
(Qwen: `<|image_pad|>`, `<|vision_start|>`, `<|vision_pad|>`, `<|video_pad|>`) we reuse them, so no embedding row
is added and the text model stays exactly the LLM. Otherwise SmolVLM's own strings are added as special tokens.

Tile markers (`<row_1_col_2>`, written by the processor) are deliberately left as plain text for the LLM's BPE:
adding 36 special tokens would add 36 untrained embedding rows, while the LLM already reads "row 1 col 2" as text
it understands; they cost a few tokens per tile next to the 64 image tokens each tile carries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

QWEN_VISION_TOKENS = ("<|image_pad|>", "<|vision_start|>", "<|vision_pad|>", "<|video_pad|>")


@dataclass(frozen=True)
class VisionTokens:
    image_token: str
    fake_image_token: str
    global_image_token: str
    video_token: str
    end_of_utterance_token: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def choose_vision_tokens(vocab: dict[str, int], eos_token: str | None, image_token: str | None = None) -> VisionTokens:
    """Reuse the LLM's reserved vision tokens when it has them; `image_token` overrides the placeholder alone."""
    if all(tok in vocab for tok in QWEN_VISION_TOKENS):
        chosen = VisionTokens("<|image_pad|>", "<|vision_start|>", "<|vision_pad|>", "<|video_pad|>",
                              eos_token or "<|im_end|>")
    else:
        chosen = VisionTokens("<image>", "<fake_token_around_image>", "<global-img>", "<video>",
                              eos_token or "<end_of_utterance>")
    if image_token:
        chosen = VisionTokens(image_token, chosen.fake_image_token, chosen.global_image_token, chosen.video_token,
                              chosen.end_of_utterance_token)
    return chosen
