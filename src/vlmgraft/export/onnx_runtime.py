"""A minimal onnxruntime runner for an exported folder: the reference for how the three graphs fit together.

It is what `vlmgraft export onnx` verifies against PyTorch, and a readable recipe for other runtimes:
1. run the processor as usual (input_ids, attention_mask, pixel_values [B, images, 3, H, W], pixel_attention_mask);
2. drop padding tiles (all-zero pixels) and run `vision.onnx` on the real tiles → features [tiles, seq, hidden];
3. `embed_tokens.onnx` on input_ids, then overwrite the rows at `image_token_id` with the features, in order;
4. `decoder.onnx` with an empty past (length 0) → logits and present key/values; feed presents back as past.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlmgraft.errors import VlmgraftError

MANIFEST = "onnx_manifest.json"


class OnnxVlm:
    def __init__(self, folder: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        folder = Path(folder)
        if not (folder / MANIFEST).exists():
            raise VlmgraftError(f"{folder} holds no {MANIFEST}; export it with `vlmgraft export onnx`")
        self.manifest = json.loads((folder / MANIFEST).read_text())
        files = self.manifest["files"]
        self.vision = ort.InferenceSession(str(folder / files["vision"]), providers=list(providers))
        self.embed = ort.InferenceSession(str(folder / files["embed_tokens"]), providers=list(providers))
        self.decoder = ort.InferenceSession(str(folder / files["decoder"]), providers=list(providers))
        self.image_token_id = self.manifest["image_token_id"]
        self.past_names = [i["name"] for i in self.manifest["graphs"]["decoder"]["inputs"][3:]]

    def image_features(self, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray) -> np.ndarray:
        """[B, images, 3, H, W] (or [tiles, 3, H, W]) → [real tiles, seq, hidden]."""
        tiles = pixel_values.reshape(-1, *pixel_values.shape[-3:]).astype(np.float32)
        masks = pixel_attention_mask.reshape(-1, *pixel_attention_mask.shape[-2:]).astype(np.int64)
        real = np.any(tiles != 0, axis=(1, 2, 3))
        return self.vision.run(None, {"pixel_values": tiles[real], "pixel_attention_mask": masks[real]})[0]

    def embeddings(self, input_ids: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        embeds = self.embed.run(None, {"input_ids": input_ids.astype(np.int64)})[0]
        if features is not None:
            slots = input_ids == self.image_token_id
            flat = features.reshape(-1, features.shape[-1])
            if int(slots.sum()) != flat.shape[0]:
                raise VlmgraftError(f"{int(slots.sum())} image tokens but {flat.shape[0]} image feature rows")
            embeds[slots] = flat
        return embeds

    def empty_past(self, batch: int) -> list[np.ndarray]:
        heads, head_dim = self.manifest["num_key_value_heads"], self.manifest["head_dim"]
        return [np.zeros((batch, heads, 0, head_dim), dtype=np.float32) for _ in self.past_names]

    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
               past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"inputs_embeds": inputs_embeds.astype(np.float32), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids.astype(np.int64), **dict(zip(self.past_names, past, strict=True))}
        logits, *present = self.decoder.run(None, feed)
        return logits, present

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray | None = None,
                pixel_attention_mask: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        features = None if pixel_values is None else self.image_features(pixel_values, pixel_attention_mask)
        positions = np.clip(np.cumsum(attention_mask, axis=-1) - 1, 0, None)  # left padding keeps positions 0..n
        return self.decode(self.embeddings(input_ids, features), attention_mask, positions,
                           self.empty_past(input_ids.shape[0]))

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray | None = None,
                 pixel_attention_mask: np.ndarray | None = None, max_new_tokens: int = 32,
                 eos_token_ids: tuple[int, ...] = ()) -> np.ndarray:
        """Greedy decoding with the KV cache; returns the new tokens [batch, ≤ max_new_tokens]."""
        logits, past = self.prefill(input_ids, attention_mask, pixel_values, pixel_attention_mask)
        positions = np.cumsum(attention_mask, axis=-1)[:, -1:] - 1
        done = np.zeros(input_ids.shape[0], dtype=bool)
        new = []
        for _ in range(max_new_tokens):
            token = logits[:, -1].argmax(-1)
            token = np.where(done, eos_token_ids[0] if eos_token_ids else token, token)
            new.append(token)
            done |= np.isin(token, eos_token_ids)
            if done.all():
                break
            attention_mask = np.concatenate([attention_mask, np.ones_like(attention_mask[:, :1])], axis=-1)
            positions = positions + 1
            logits, past = self.decode(self.embeddings(token[:, None]), attention_mask, positions, past)
        return np.stack(new, axis=1)
