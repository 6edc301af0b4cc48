"""The graft itself: a donor VLM's vision tower and connector placed in front of a causal LM, as a stock model.

- `families`: where each module group lives per donor family (vision, connector, LLM layers), declared once;
- `tokens` and `template`: the image placeholder tokens and the LLM's chat template extended for image parts;
- `surgery`: builds the `SmolVLMForConditionalGeneration` from the two sources, with a ledger of every tensor;
- `audit`: the checks that rule out a silently broken graft; `build`: `vlmgraft build|audit` (load, graft, audit,
  save); `commands`: their command line.
"""
