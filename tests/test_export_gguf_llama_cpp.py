"""The GGUF export run by llama.cpp itself, through llama-cpp-python: text logits, and an image prompt through mtmd.

llama-cpp-python compiles llama.cpp from source when installed, which takes long on small machines, so it is not
in the [dev] extra: this module is skipped, with that reason in the test summary, where it is not installed.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
import torch
from conftest import scramble
from PIL import Image

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed, so the GGUF export was NOT run by llama.cpp "
                        "(CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install llama-cpp-python builds it from source)")
mtmd = pytest.importorskip("llama_cpp.mtmd_cpp", reason="this llama-cpp-python has no mtmd bindings")

from vlmgraft.export import gguf_export, gguf_source  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = "What colour is the shape?"


@pytest.fixture(scope="module")
def graft_and_gguf(tiny_graft, tmp_path_factory):
    """The tiny graft scrambled (so answers depend on the input) with f16-exact weights, and its GGUF export."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    root = tmp_path_factory.mktemp("gguf-runtime")
    model = AutoModelForImageTextToText.from_pretrained(tiny_graft, dtype=torch.float32).eval()
    scramble(model, seed=3)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())  # the f16 GGUF then holds exactly these weights
    model.save_pretrained(root / "graft")
    processor = AutoProcessor.from_pretrained(tiny_graft)
    processor.save_pretrained(root / "graft")
    tree = gguf_source.converter_tree(os.environ.get(gguf_source.ENV) or "download")
    gguf_export.export_gguf(str(root / "graft"), root / "gguf", llama_cpp=str(tree), log=lambda *_: None)
    return model, processor, root / "gguf"


@pytest.fixture(scope="module")
def llm(graft_and_gguf):
    _, _, out = graft_and_gguf
    model = llama_cpp.Llama(model_path=str(out / gguf_export.TEXT_FILE), n_ctx=512, n_batch=512, logits_all=True,
                            n_threads=2, verbose=False)
    yield model
    model.close()


def _chat(processor, image: bool) -> str:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": PROMPT}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def test_text_logits_match_transformers_within_f16(graft_and_gguf, llm):
    model, processor, _ = graft_and_gguf
    text = _chat(processor, image=False)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    # llama.cpp reads the prompt into the same ids (the pre-tokenizer and special tokens agree).
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
    llm.reset()
    llm._ctx.kv_cache_clear()
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0]
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, atol=5e-3 * scale, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def _quadrants(size: int = 64) -> Image.Image:
    """Four flat colours: tiles cut from it are flat, so resampling filters can only differ at the seams."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    half = size // 2
    pixels[:half, :half], pixels[:half, half:] = (220, 30, 30), (30, 200, 40)
    pixels[half:, :half], pixels[half:, half:] = (20, 40, 210), (240, 230, 30)
    return Image.fromarray(pixels)


def _mtmd_chunks(ctx, text: str, image: Image.Image):
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
    bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, data)
    chunks = mtmd.mtmd_input_chunks_init()
    inp = mtmd.mtmd_input_text()
    raw = text.encode()
    inp.text, inp.text_len, inp.add_special, inp.parse_special = raw, len(raw), True, True
    bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
    assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), bitmaps, 1) == 0
    mtmd.mtmd_bitmap_free(bitmap)
    return chunks


def test_image_prompt_through_mtmd_matches_our_processor_and_answer(graft_and_gguf, llm):
    model, processor, out = graft_and_gguf
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 2, False, False
    ctx = mtmd.mtmd_init_from_file(str(out / gguf_export.MMPROJ_FILE).encode(), llm.model, params)
    assert ctx, "mtmd could not load mmproj.gguf with text.gguf"
    image = _quadrants()
    text = _chat(processor, image=True)
    batch = processor(text=[text], images=[[image]], return_tensors="pt")
    image_id = model.config.image_token_id
    marker = mtmd.mtmd_default_marker().decode()
    chunks = _mtmd_chunks(ctx, text.replace(processor.image_token, marker), image)
    try:
        # 1. mtmd frames the image with exactly the tokens our processor writes (markers, tile names, newlines).
        ids, image_chunks = [], []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                ids += [ptr[j] for j in range(n.value)]
            else:
                image_chunks.append(chunk)
                ids += [image_id] * mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        assert ids == batch["input_ids"][0].tolist()

        # 2. each tile's embeddings (tiles in order, the overview last in both) equal our vision tower + connector.
        with torch.no_grad():
            features = model.model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"])
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        features = torch.cat(list(features)).reshape(len(image_chunks), -1, model.config.text_config.hidden_size)
        for k, chunk in enumerate(image_chunks):
            assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            embd = mtmd.mtmd_get_output_embd(ctx)
            got = torch.tensor([embd[j] for j in range(n * features.shape[-1])]).reshape(n, -1)
            scale = features[k].abs().max().item()
            torch.testing.assert_close(got, features[k], atol=5e-3 * scale, rtol=0, msg=f"tile {k}")

        # 3. the greedy answer is ours.
        llm.reset()
        llm._ctx.kv_cache_clear()  # as llama-cpp-python's own mtmd chat handler starts a prompt
        n_past = llama_cpp.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(ctx, llm.ctx, chunks, 0, 0, llm.n_batch, True,
                                            ctypes.byref(n_past)) == 0
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        answer = [int(logits.argmax())]
        llm.n_tokens = n_past.value
        for _ in range(5):
            llm.eval([answer[-1]])
            answer.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_free(ctx)
    with torch.no_grad():
        ours = model.generate(**batch, max_new_tokens=6, do_sample=False)[0, batch["input_ids"].shape[1]:].tolist()
    assert answer == ours
