"""The model layer: how each export family turns processor pixels into features and places them, plus the helpers
(dtype names, unwrapping, the LLM's config, image token counts) that training, inference and export share."""

from vlmgraft.model.common import DTYPES, image_seq_len, text_config, unwrap_model
from vlmgraft.model.images import ImagePath, image_path_for

__all__ = ["DTYPES", "ImagePath", "image_path_for", "image_seq_len", "text_config", "unwrap_model"]
