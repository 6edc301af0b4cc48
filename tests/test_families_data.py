"""The training data path on LLaVA and Exaone4.5 grafts: samples encode as their processor does, and the collator's
batch runs through the HF forward and through the model layer's index merge alike."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmgraft.data.collate import VisionChatCollator
from vlmgraft.data.sample import Sample
from vlmgraft.model import image_path_for
from vlmgraft.model.images import image_path_for_processor

RED = Image.new("RGB", (64, 48), (200, 30, 30))
BLUE = Image.new("RGB", (40, 64), (20, 30, 200))


def _sample(images: list[Image.Image], answer: str = "red") -> Sample:
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": "what colour is it?"}]
    return Sample(messages=[{"role": "user", "content": parts}, {"role": "assistant", "content": answer}],
                  images=images, source="t", origin="t")


@pytest.mark.parametrize("name", ["llava", "exaone4_5"])
def test_samples_encode_as_the_processor_does_and_train_on_the_answer(name, family_grafts):
    processor = AutoProcessor.from_pretrained(family_grafts[name])
    assert image_path_for_processor(processor).family.name == name
    sample = _sample([RED, BLUE])
    collator = VisionChatCollator(processor, max_length=1024, pixels="uint8")  # uint8 is SmolVLM's: ignored here
    encoded = collator.encode(sample)
    text = processor.apply_chat_template(sample.messages, enable_thinking=False)
    reference = processor(text=[text], images=sample.images, return_tensors="pt", add_special_tokens=False)
    assert encoded.input_ids.tolist() == reference["input_ids"][0].tolist()
    trained = processor.tokenizer.decode(encoded.input_ids[encoded.labels != -100])
    assert trained == "red<|im_end|>"

    batch = collator([sample, _sample([RED], "blue"), _sample([], "none")])
    path = image_path_for_processor(processor)
    assert set(path.pixel_keys) <= set(batch)
    expected = path.concat([path.prompt_pixels(processor(text=[processor.image_token], images=[image],
                                                         return_tensors="pt")) for image in (RED, BLUE, RED)])
    for key, value in expected.items():
        assert torch.equal(batch[key], value), key
    image_tokens = int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids(processor.image_token)).sum())
    assert batch["loss_plan"].image_positions.numel() == image_tokens

    model = AutoModelForImageTextToText.from_pretrained(family_grafts[name]).eval()
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_plan")}
    with torch.no_grad():
        stock = model(**inputs).logits
        embeds = image_path_for(model).train_embeddings(model, inputs, batch["loss_plan"])
        placed = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(placed, stock)


def test_dpo_batches_refuse_other_families_by_name(family_grafts):
    from vlmgraft.errors import VlmgraftError
    from vlmgraft.train.rl.collate import PreferenceCollator

    processor = AutoProcessor.from_pretrained(family_grafts["exaone4_5"])
    with pytest.raises(VlmgraftError, match="exaone4_5 graft.*align, align-head, finetune or full"):
        PreferenceCollator(processor)
