"""The batching engine on CPU (no CUDA graphs): same tokens as `model.generate()`, per-row seeds, joining mid-way."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmgraft.infer.engine import Engine, EngineConfig
from vlmgraft.infer.prompts import prepare
from vlmgraft.infer.sampling import SamplingParams, sample_tokens, uniform_from

RED = Image.new("RGB", (64, 48), (200, 30, 30))
BLUE = Image.new("RGB", (40, 64), (20, 30, 200))
CASES = [  # different lengths, 0/1/2 images
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hello"}]}], [RED]),
    ([{"role": "user", "content": [{"type": "text", "text": "what colour is the square in the picture"}]}], []),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "two"}]}],
     [RED, BLUE]),
]




def _prepared(processor):
    return [prepare(processor, conv, images) for conv, images in CASES]


def _hf_greedy(model, prompt, max_new_tokens):
    ids = torch.tensor([prompt.input_ids])
    extra = {}
    if prompt.pixel_values is not None:
        extra = {"pixel_values": prompt.pixel_values[None], "pixel_attention_mask": prompt.pixel_attention_mask[None]}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=1.0, top_p=1.0, top_k=50, eos_token_id=[-1], pad_token_id=0,
                         **extra)
    return out[0, ids.shape[1]:].tolist()


def _run(engine, prompts, params):
    seqs = [engine.add(p.input_ids, params, p.pixel_values, p.pixel_attention_mask) for p in prompts]
    for _ in range(200):
        if not engine.has_work():
            break
        engine.step()
    assert not engine.has_work()
    return seqs


def test_compiled_decode_gives_the_eager_tokens(loaded):
    """`serve --compile`: the torch.compile'd decode step (here on CPU, no graphs) writes each slot's cache row in
    place and picks the same tokens as `model.generate()`, with rows joining at different lengths."""
    model, processor = loaded
    prompts = _prepared(processor)
    reference = [_hf_greedy(model, p, 6) for p in prompts]
    engine = Engine(model, processor.tokenizer, EngineConfig(max_batch_size=4, max_seq_len=256, sync_every=2,
                                                             compile=True), eos_token_ids=[])
    seqs = _run(engine, prompts, SamplingParams(max_new_tokens=6))
    assert [s.output_ids for s in seqs] == reference


@pytest.mark.parametrize(("sync_every", "bucketed"), [(1, False), (3, True)])
def test_greedy_batch_equals_model_generate_for_each_prompt(loaded, sync_every, bucketed):
    model, processor = loaded
    prompts = _prepared(processor)
    reference = [_hf_greedy(model, p, 9) for p in prompts]
    assert len({tuple(r) for r in reference}) == len(reference)  # the comparison is not trivially constant
    # bucketed: batches padded to a power of two (as for CUDA graphs), the padding row writing the scratch slot
    engine = Engine(model, processor.tokenizer, EngineConfig(max_batch_size=4, max_seq_len=512, sync_every=sync_every,
                                                             bucket_batches=bucketed), eos_token_ids=[])
    seqs = _run(engine, prompts, SamplingParams(max_new_tokens=9))
    assert [s.output_ids for s in seqs] == reference
    assert all(s.finish_reason == "length" for s in seqs)
    assert engine.stats["max_prefill_batch"] == 3 and engine.stats["max_decode_batch"] == 3


def test_a_request_joining_mid_decode_gets_the_same_answer_as_alone(loaded):
    model, processor = loaded
    prompts = _prepared(processor)
    engine = Engine(model, processor.tokenizer, EngineConfig(max_batch_size=4, max_seq_len=512, sync_every=2,
                                                             bucket_batches=True), eos_token_ids=[])
    alone = _run(engine, prompts[2:], SamplingParams(max_new_tokens=6))[0].output_ids
    first = engine.add(prompts[0].input_ids, SamplingParams(max_new_tokens=12), prompts[0].pixel_values,
                       prompts[0].pixel_attention_mask)
    engine.step()
    engine.step()  # `first` is decoding now; the next prompt joins the running batch
    late = _run(engine, prompts[2:], SamplingParams(max_new_tokens=6))[0]
    assert late.output_ids == alone
    assert len(first.output_ids) == 12 and engine.stats["max_decode_batch"] >= 2


def test_seeded_sampling_is_reproducible_and_independent_of_batch_neighbours(loaded):
    model, processor = loaded
    prompts = _prepared(processor)
    engine = Engine(model, processor.tokenizer, EngineConfig(max_batch_size=4, max_seq_len=512), eos_token_ids=[])
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = _run(engine, prompts[:1], params)[0].output_ids
    others = SamplingParams(max_new_tokens=10, temperature=0.7, seed=5)
    seqs = [engine.add(p.input_ids, params if i == 0 else others, p.pixel_values, p.pixel_attention_mask)
            for i, p in enumerate(prompts)]
    _run(engine, [], params)
    assert seqs[0].output_ids == alone
    reseeded = _run(engine, prompts[:1], SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50,
                                                        seed=99))[0].output_ids
    assert reseeded != alone
    greedy = _run(engine, prompts[:1], SamplingParams(max_new_tokens=10))[0].output_ids
    top1 = _run(engine, prompts[:1], SamplingParams(max_new_tokens=10, temperature=1.5, top_k=1, seed=3))[0]
    assert top1.output_ids == greedy  # top-k 1 leaves only the argmax


def test_identical_requests_are_separate_sequences(loaded):
    model, processor = loaded
    prompt = _prepared(processor)[0]
    engine = Engine(model, processor.tokenizer, EngineConfig(max_batch_size=1, max_seq_len=256), eos_token_ids=[])
    seqs = [engine.add(prompt.input_ids, SamplingParams(max_new_tokens=3), prompt.pixel_values.clone(),
                       prompt.pixel_attention_mask.clone()) for _ in range(3)]  # one slot: two wait in the queue
    engine.cancel(seqs[1])
    _run(engine, [], SamplingParams())
    assert seqs[0].output_ids == seqs[2].output_ids and len(seqs[0].output_ids) == 3 and seqs[1].output_ids == []


def test_eos_stops_a_sequence_and_cancel_frees_its_slot(loaded):
    model, processor = loaded
    prompts = _prepared(processor)
    probe = Engine(model, processor.tokenizer, EngineConfig(max_batch_size=2, max_seq_len=512), eos_token_ids=[])
    greedy = _run(probe, prompts[1:2], SamplingParams(max_new_tokens=5))[0].output_ids
    engine = Engine(model, processor.tokenizer, EngineConfig(max_batch_size=2, max_seq_len=512),
                    eos_token_ids=[greedy[2]])
    stopped = _run(engine, prompts[1:2], SamplingParams(max_new_tokens=5))[0]
    assert stopped.output_ids == greedy[:2] and stopped.finish_reason == "stop"
    ignoring = _run(engine, prompts[1:2], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    assert ignoring.output_ids == greedy and ignoring.finish_reason == "length"
    seq = engine.add(prompts[1].input_ids, SamplingParams(max_new_tokens=100))
    engine.step()
    engine.cancel(seq)
    assert not engine.has_work() and seq.finish_reason == "stop"


def test_warmup_leaves_an_idle_engine_with_clean_statistics(loaded):
    model, processor = loaded
    engine = Engine(model, processor.tokenizer, EngineConfig(max_batch_size=2, max_seq_len=256, sync_every=2))
    engine.warmup()
    assert not engine.has_work() and engine.stats["generated_tokens"] == 0
    prompt = _prepared(processor)[1]
    assert len(_run(engine, [prompt], SamplingParams(max_new_tokens=3, ignore_eos=True))[0].output_ids) == 3


def test_prompts_that_cannot_fit_or_miss_their_tiles_are_refused(loaded):
    model, processor = loaded
    prompts = _prepared(processor)
    engine = Engine(model, processor.tokenizer, EngineConfig(max_batch_size=2, max_seq_len=256))
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.add(prompts[0].input_ids, SamplingParams(max_new_tokens=200), prompts[0].pixel_values,
                   prompts[0].pixel_attention_mask)
    with pytest.raises(ValueError, match="image placeholder"):
        engine.add(prompts[0].input_ids, SamplingParams(max_new_tokens=4))


def test_sampling_respects_top_k_and_top_p_and_follows_the_distribution():
    vocab = 6
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -2.0]]).repeat(4000, 1)
    counters = torch.arange(4000)

    def draw(temperature, top_p, top_k, candidates=0):
        rows = logits.shape[0]
        return sample_tokens(logits, torch.full((rows,), temperature), torch.full((rows,), top_p),
                             torch.full((rows,), top_k), torch.full((rows,), 42), counters, candidates)

    assert set(draw(1.0, 1.0, 2).tolist()) == {0, 1}
    assert torch.equal(draw(1.0, 0.9, 3, candidates=4), draw(1.0, 0.9, 3))  # ranking only the top 4 is exact
    top3 = torch.bincount(draw(1.0, 0.8, 3), minlength=vocab).float() / logits.shape[0]
    renormalised = logits[0, :3].softmax(-1)  # top-p applies to the top-k tokens renormalised (as in HF and vLLM)
    assert top3[2] == 0 and renormalised[0] + renormalised[1] >= 0.8 > renormalised[0]
    assert torch.allclose(top3[:2], renormalised[:2] / renormalised[:2].sum(), atol=0.03)
    probs = logits[0].softmax(-1)
    nucleus = draw(1.0, float(probs[0] + probs[1]) - 1e-4, vocab)  # the two most likely tokens hold that mass
    assert set(nucleus.tolist()) == {0, 1}
    free = torch.bincount(draw(1.0, 1.0, vocab), minlength=vocab).float() / logits.shape[0]
    assert torch.allclose(free, probs, atol=0.03)
    assert draw(0.0, 1.0, vocab).eq(0).all()  # temperature 0 is greedy
    u = uniform_from(torch.full((10000,), 7), torch.arange(10000))
    assert 0 < u.min() and u.max() < 1 and abs(float(u.mean()) - 0.5) < 0.02
