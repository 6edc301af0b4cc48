"""Donor families: where each module group lives in the exported architecture, declared once.

Freezing, LoRA targets, per-group learning rates and the graft's weight accounting all derive from these prefixes,
so adding a donor family means adding one entry here plus its surgery. A family is named after the architecture it
exports to: SmolVLM donors give `SmolVLMForConditionalGeneration`; standalone SigLIP and CLIP encoders (dual encoders
or vision-only checkpoints) give a stock `LlavaForConditionalGeneration` (`vlmgraft.graft.llava`); Qwen2.5-VL donors
give a stock `Exaone4_5_ForConditionalGeneration` (`vlmgraft.graft.exaone`), whose patch merger sits inside the
vision module: the longest matching prefix decides a parameter's group.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmgraft.errors import VlmgraftError

GROUPS = ("vision", "connector", "llm", "lm_head")


@dataclass(frozen=True)
class DonorFamily:
    name: str
    model_types: tuple[str, ...]  # donor config model_types this family takes
    export_architecture: str
    export_model_type: str  # model_type of the exported graft (training and inference look the family up by it)
    # Parameter-name prefixes of each module group in the exported model.
    vision: str
    connector: str
    llm: str
    lm_head: str
    # The repeated blocks (for "train the last N vision layers" and for compiling block by block) and the final
    # vision norm.
    vision_layers: str
    vision_post_norm: str | None  # None: the tower has none (Qwen2.5-VL's merger normalises its own input)
    llm_layers: str
    vision_patch_embedding: str  # a Conv2d whose stride equals its kernel (Qwen2.5-VL: a Conv3d, left as is)
    # Prefixes of the donor's loaded state dict: what is kept from it (donor_vision, tried in order, renamed to
    # donor_vision_target) and what the LLM or a new connector replaces.
    donor_vision: tuple[str, ...]
    donor_vision_target: str
    donor_connector: str | None
    donor_text: tuple[str, ...]
    # Parts of the donor's connector that still fit the graft and are copied; the rest is re-initialised.
    donor_connector_kept: tuple[str, ...] = ()
    donor_connector_dropped_reason: str = "connector re-initialised at the LLM's hidden size"
    # Other donor tensors left behind, checked before everything else: (prefix, reason).
    donor_dropped: tuple[tuple[str, str], ...] = ()
    # The export config's attribute naming the vision layer(s) the connector reads (LLaVA's hidden-state index);
    # None: the last layer through the post-norm.
    vision_feature_layer_key: str | None = None

    def group_of(self, param_name: str) -> str:
        """The module group a parameter belongs to (longest prefix wins; lm_head tied to embeddings is 'llm')."""
        matches = [group for group in GROUPS if param_name.startswith(getattr(self, group) + ".")]
        if matches:
            return max(matches, key=lambda group: len(getattr(self, group)))
        raise VlmgraftError(f"parameter {param_name!r} belongs to no module group of the {self.name} family")

    def vision_layers_read(self, config, total: int) -> int:
        """How many of the `total` encoder layers the connector's input passes through (the rest never get a
        gradient, so training them is wasted)."""
        if self.vision_feature_layer_key is None:
            return total
        chosen = getattr(config, self.vision_feature_layer_key)
        # hidden_states[0] is the embeddings' output, hidden_states[i] layer i's: index i has run i layers.
        return max(i if i >= 0 else total + 1 + i for i in (chosen if isinstance(chosen, list) else [chosen]))

    @property
    def reads_post_norm(self) -> bool:
        return self.vision_feature_layer_key is None and self.vision_post_norm is not None

    def vision_layer_index(self, param_name: str) -> int | None:
        prefix = self.vision_layers + "."
        if not param_name.startswith(prefix):
            return None
        return int(param_name[len(prefix):].split(".", 1)[0])


SMOLVLM = DonorFamily(
    name="smolvlm",
    model_types=("smolvlm",),
    export_architecture="SmolVLMForConditionalGeneration",
    export_model_type="smolvlm",
    vision="model.vision_model",
    connector="model.connector",
    llm="model.text_model",
    lm_head="lm_head",
    vision_layers="model.vision_model.encoder.layers",
    vision_post_norm="model.vision_model.post_layernorm",
    llm_layers="model.text_model.layers",
    vision_patch_embedding="model.vision_model.embeddings.patch_embedding",
    donor_vision=("model.vision_model.",),
    donor_vision_target="model.vision_model.",
    donor_connector="model.connector.",
    donor_text=("model.text_model.", "lm_head."),
)

_POOLING_HEAD = ("SigLIP's attention-pooling head: LLaVA reads the patch features, so the graft's vision config "
                 "sets vision_use_head=false")
_TOWER_HEADS = "contrastive head of the dual encoder: a VLM reads the vision tower's patch features"
LLAVA = DonorFamily(
    name="llava",
    # SigLIP2 NaFlex checkpoints are converted to the fixed-resolution SigLIP layout first (graft/naflex.py).
    model_types=("siglip", "siglip_vision_model", "clip", "clip_vision_model", "siglip2", "siglip2_vision_model"),
    export_architecture="LlavaForConditionalGeneration",
    export_model_type="llava",
    vision="model.vision_tower",
    connector="model.multi_modal_projector",
    llm="model.language_model",
    lm_head="lm_head",
    vision_layers="model.vision_tower.encoder.layers",
    vision_post_norm="model.vision_tower.post_layernorm",
    llm_layers="model.language_model.layers",
    vision_patch_embedding="model.vision_tower.embeddings.patch_embedding",
    # A dual encoder keeps its tower under vision_model.; a vision-only checkpoint is the tower itself.
    donor_vision=("vision_model.", ""),
    donor_vision_target="model.vision_tower.",
    donor_connector=None,
    donor_text=(),
    vision_feature_layer_key="vision_feature_layer",
    donor_dropped=(("text_model.", "the dual encoder's text tower: the LLM reads the text"),
                   ("vision_model.head.", _POOLING_HEAD), ("head.", _POOLING_HEAD),
                   ("logit_scale", _TOWER_HEADS), ("logit_bias", _TOWER_HEADS),
                   ("visual_projection.", _TOWER_HEADS), ("text_projection.", _TOWER_HEADS)),
)

EXAONE4_5 = DonorFamily(
    name="exaone4_5",
    model_types=("qwen2_5_vl",),
    export_architecture="Exaone4_5_ForConditionalGeneration",
    export_model_type="exaone4_5",
    vision="model.visual",  # minus the merger, which is the connector (longest prefix wins)
    connector="model.visual.merger",
    llm="model.language_model",
    lm_head="lm_head",
    vision_layers="model.visual.blocks",
    vision_post_norm=None,
    llm_layers="model.language_model.layers",
    vision_patch_embedding="model.visual.patch_embed.proj",  # a Conv3d over (temporal, h, w) patches
    donor_vision=("model.visual.",),
    donor_vision_target="model.visual.",
    donor_connector="model.visual.merger.",
    donor_text=("model.language_model.", "lm_head."),
    donor_connector_kept=("model.visual.merger.ln_q.", "model.visual.merger.mlp.0."),
    donor_connector_dropped_reason=("the patch merger's output layer writes into the donor LLM's embedding space; "
                                    "re-initialised at the LLM's hidden size"),
)

FAMILIES = {family.name: family for family in (SMOLVLM, LLAVA, EXAONE4_5)}


def family_for(model_type: str) -> DonorFamily:
    """The family of a saved graft's model_type (or of a donor's: SmolVLM donors export to their own type)."""
    for family in FAMILIES.values():
        if model_type == family.export_model_type or model_type in family.model_types:
            return family
    return donor_family_for(model_type)


def donor_family_for(model_type: str) -> DonorFamily:
    """The family that takes a donor of this config model_type."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise VlmgraftError(f"donor model_type {model_type!r} is not supported yet; supported donor families: {supported}")
