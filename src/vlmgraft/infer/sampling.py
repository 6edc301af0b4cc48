"""Sampling settings and next-token choice on the device, for a whole batch at once and without host syncs.

Each row carries its own temperature, top-p, top-k and seed as tensors, so one captured CUDA graph serves any mix of
greedy and sampled requests. Randomness is counter-based: the uniform number a row draws at a position is a hash of
(its seed, that position), so a seeded request gives the same answer alone or batched with strangers, on any device.
torch's generators cannot give that per row inside a graph, hence the small hash written here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    """How to pick tokens for one request. temperature 0 is greedy; top_k 0 and top_p 1.0 mean "no cut-off"."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def seed32(self) -> int:
        """The seed folded to 32 bits; a random one when none was given."""
        seed = random.getrandbits(32) if self.seed is None else int(self.seed)
        return (seed ^ (seed >> 32)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # Integer avalanche (Wang/Mueller style). Operands stay below 2**59, so int64 arithmetic never overflows.
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def uniform_from(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """A deterministic uniform number in (0, 1) per row from int64 `seed` (< 2**32) and `counter` (< 2**31)."""
    x = _mix32(seed ^ (counter * 0x9E3779B1 & _MASK32))
    x = _mix32(x ^ 0x27D4EB2F)
    return ((x >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                  seed: torch.Tensor, counter: torch.Tensor, candidates: int = 0) -> torch.Tensor:
    """Next token per row of float32 `logits` (B, V): argmax where temperature is 0, else top-k/top-p sampling.

    Same order as transformers and vLLM: temperature, then top-k, then top-p over the renormalised top-k. top_k
    must already be in [1, V] (the host maps "off" to V). `candidates` > 0 (at least every sampled row's top_k)
    ranks only that many tokens instead of sorting the vocabulary, with the same result. Inverse-CDF sampling needs
    one uniform per row, which keeps the random part cheap.
    """
    greedy = logits.argmax(dim=-1)
    scaled = logits / temperature.clamp(min=1e-5).unsqueeze(-1)
    if candidates:
        ranked, ranked_ids = torch.topk(scaled, candidates, dim=-1)
    else:
        ranked, ranked_ids = torch.sort(scaled, dim=-1, descending=True)
    ranks = torch.arange(ranked.shape[-1], device=ranked.device).unsqueeze(0)
    ranked = ranked.masked_fill(ranks >= top_k.unsqueeze(-1), float("-inf"))
    probs = ranked.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    cdf = (probs * (mass_before < top_p.unsqueeze(-1))).cumsum(dim=-1)
    target = uniform_from(seed, counter) * cdf[:, -1]
    choice = torch.searchsorted(cdf, target.unsqueeze(-1)).clamp_(max=ranked.shape[-1] - 1)
    sampled = ranked_ids.gather(-1, choice).squeeze(-1)
    return torch.where(temperature > 0, sampled, greedy)


def candidate_count(params: list[SamplingParams], limit: int = 1024) -> int | None:
    """How the sampled rows of a batch rank tokens: None = all greedy, 0 = full sort, K = top-K candidates."""
    sampled = [p for p in params if not p.greedy]
    if not sampled:
        return None
    if all(0 < p.top_k <= limit for p in sampled):
        return 1 << (max(p.top_k for p in sampled) - 1).bit_length()  # few distinct graph shapes
    return 0


def model_sampling_defaults(model) -> dict:
    """temperature/top_p/top_k from the model's generation config (greedy when it does not sample)."""
    config = getattr(model, "generation_config", None)
    if config is None or not getattr(config, "do_sample", False):
        return {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
    return {"temperature": float(config.temperature or 1.0), "top_p": float(config.top_p or 1.0),
            "top_k": int(config.top_k or 0)}
