"""Donor families: where each module group lives in the exported architecture, declared once.

Freezing, LoRA targets, per-group learning rates and the graft's weight accounting all derive from these prefixes,
so adding a donor family (Qwen2.5-VL's ViT, a standalone SigLIP) means adding one entry here plus its surgery.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmgraft.errors import VlmgraftError

GROUPS = ("vision", "connector", "llm", "lm_head")


@dataclass(frozen=True)
class DonorFamily:
    name: str
    model_types: tuple[str, ...]
    export_architecture: str
    # Parameter-name prefixes of each module group in the exported model.
    vision: str
    connector: str
    llm: str
    lm_head: str
    # The repeated blocks (for "train the last N vision layers" and for compiling block by block) and the final
    # vision norm.
    vision_layers: str
    vision_post_norm: str
    llm_layers: str
    vision_patch_embedding: str  # a Conv2d whose stride equals its kernel
    # Prefixes of the donor's own checkpoint: what is kept from it and what the LLM replaces.
    donor_vision: str
    donor_connector: str
    donor_text: tuple[str, ...]

    def group_of(self, param_name: str) -> str:
        """The module group a parameter belongs to (longest prefix wins; lm_head tied to embeddings is 'llm')."""
        for group in GROUPS:
            if param_name.startswith(getattr(self, group) + "."):
                return group
        raise VlmgraftError(f"parameter {param_name!r} belongs to no module group of the {self.name} family")

    def vision_layer_index(self, param_name: str) -> int | None:
        prefix = self.vision_layers + "."
        if not param_name.startswith(prefix):
            return None
        return int(param_name[len(prefix):].split(".", 1)[0])


SMOLVLM = DonorFamily(
    name="smolvlm",
    model_types=("smolvlm",),
    export_architecture="SmolVLMForConditionalGeneration",
    vision="model.vision_model",
    connector="model.connector",
    llm="model.text_model",
    lm_head="lm_head",
    vision_layers="model.vision_model.encoder.layers",
    vision_post_norm="model.vision_model.post_layernorm",
    llm_layers="model.text_model.layers",
    vision_patch_embedding="model.vision_model.embeddings.patch_embedding",
    donor_vision="model.vision_model.",
    donor_connector="model.connector.",
    donor_text=("model.text_model.", "lm_head."),
)

FAMILIES = {family.name: family for family in (SMOLVLM,)}


def family_for(model_type: str) -> DonorFamily:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise VlmgraftError(f"donor model_type {model_type!r} is not supported yet; supported donor families: {supported}")
