"""`stage: chord`: GRPO with a supervised loss on expert data mixed in (CHORD, arXiv:2508.11408).

loss = (1 − μ)·L_GRPO + μ·L_SFT, where
- L_GRPO is GRPOTrainer's own loss (already divided by the gradient-accumulation steps);
- L_SFT is the negative log-likelihood of an expert batch's answer tokens, averaged over those tokens and divided by
  the gradient-accumulation steps like the GRPO term; with `phi: true` each token is weighted by φ = p(1 − p) of its
  own probability, detached (CHORD-φ: tokens the model already is sure of, or finds absurd, weigh little);
- μ follows `chord_mu`: 0 → mu_peak linearly over mu_warmup_steps, a cosine down to mu_valley over mu_decay_steps,
  then mu_valley.
The expert data is any SFT SPEC (`chord.sft_data`), encoded like the SFT stages encode it. GRPO's settings and rewards
come from the `grpo:` section; μ and both losses are logged as `chord/mu`, `chord/sft_loss`, `chord/grpo_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from trl import GRPOConfig

from vlmgraft.data.encode import IGNORE
from vlmgraft.errors import VlmgraftError
from vlmgraft.train.config import TrainConfig
from vlmgraft.train.rl.grpo import GraftGRPOTrainer, build_grpo


@dataclass(frozen=True)
class ChordSettings:
    sft_data: str = ""
    mu_peak: float = 0.9
    mu_valley: float = 0.05
    mu_warmup_steps: int = 0
    mu_decay_steps: int = 200
    phi: bool = False
    sft_batch_size: int | None = None  # expert rows per micro-batch; None: per_device_train_batch_size

    @classmethod
    def from_config(cls, config: TrainConfig) -> ChordSettings:
        from vlmgraft.train.loading import typed_values

        known = [f.name for f in fields(cls)]
        for key in config.chord:
            if key not in known:
                raise VlmgraftError(f"config key 'chord.{key}' is not a CHORD setting ({', '.join(known)}); GRPO "
                                    f"settings go in the 'grpo' section")
        settings = cls(**typed_values(config.chord, "chord"))
        if not settings.sft_data:
            raise VlmgraftError("chord.sft_data is required: the expert SFT data (any `vlmgraft data` SPEC)")
        if not (0 <= settings.mu_valley <= 1 and 0 <= settings.mu_peak <= 1):
            raise VlmgraftError("chord.mu_peak and chord.mu_valley must lie in [0, 1]")
        return settings


def chord_mu(step: int, peak: float, valley: float, warmup_steps: int, decay_steps: int) -> float:
    """μ at an optimiser step: linear warm-up from 0, a cosine from peak to valley, then valley."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * step / warmup_steps
    into_decay = step - max(warmup_steps, 0)
    if decay_steps > 0 and into_decay < decay_steps:
        return valley + (peak - valley) * 0.5 * (1 + math.cos(math.pi * into_decay / decay_steps))
    return valley


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor, phi: bool) -> torch.Tensor:
    """Mean negative log-likelihood over the expert answer tokens; with `phi`, each weighted by p(1−p), detached."""
    mask = mask.to(token_logps.dtype)
    nll = -token_logps
    if phi:
        p = token_logps.detach().exp()
        nll = nll * (p * (1 - p))
    return (nll * mask).sum() / mask.sum().clamp(min=1.0)


def combine(grpo_loss: torch.Tensor, expert_loss: torch.Tensor | None, mu: float, accumulation: int) -> torch.Tensor:
    """(1 − μ)·L_GRPO + μ·L_SFT / accumulation steps (L_GRPO arrives already divided by them)."""
    if expert_loss is None or mu == 0:
        return (1 - mu) * grpo_loss
    return (1 - mu) * grpo_loss + mu * expert_loss / accumulation


def expert_token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the labelled tokens of a VisionChatCollator batch, at temperature 1, with logits only at
    the labelled columns (the model's `logits_to_keep`)."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = (targets != IGNORE).any(0).nonzero().squeeze(1)
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_plan")}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits.float()
    chosen = targets[:, keep]
    mask = chosen != IGNORE
    logps = torch.log_softmax(logits, dim=-1).gather(-1, chosen.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps, mask


class ChordTrainer(GraftGRPOTrainer):
    def __init__(self, *args, chord: ChordSettings, expert_loader, **kwargs):
        super().__init__(*args, **kwargs)
        self.chord = chord
        self._expert_loader = expert_loader
        self._expert_batches = None

    def current_mu(self) -> float:
        c = self.chord
        return chord_mu(self.state.global_step, c.mu_peak, c.mu_valley, c.mu_warmup_steps, c.mu_decay_steps)

    def _next_expert_batch(self) -> dict:
        for _ in range(100):  # an epoch of batches whose rows were all skipped would otherwise loop for ever
            if self._expert_batches is None:
                self._expert_batches = iter(self._expert_loader)
            batch = next(self._expert_batches, None)
            if batch is None:
                self._expert_batches = None
                continue
            if batch:
                return {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        raise VlmgraftError(f"chord.sft_data {self.chord.sft_data!r}: no usable expert batch (every row skipped)")

    def _compute_loss(self, model, inputs):
        grpo_loss = super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        mu = self.current_mu() if mode == "train" else 0.0
        expert = None
        if mu > 0:
            with self.accelerator.autocast():
                logps, mask = expert_token_logps(model, self._next_expert_batch())
            expert = sft_loss(logps, mask, self.chord.phi)
            self._metrics[mode]["chord/sft_loss"].append(expert.detach().item())
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        self._metrics[mode]["chord/mu"].append(mu)
        self._metrics[mode]["chord/grpo_loss"].append(grpo_loss.detach().item() * accumulation)
        return combine(grpo_loss, expert, mu, accumulation)


def build_chord(config: TrainConfig, model, processor, family, callbacks: list):
    from torch.utils.data import DataLoader

    from vlmgraft.data.collate import VisionChatCollator
    from vlmgraft.data.spec import build_dataset

    settings = ChordSettings.from_config(config)
    expert, _ = build_dataset(settings.sft_data, seed=config.data_seed, eval_size=0)
    s = config.data_settings
    collator = VisionChatCollator(processor, max_length=s.max_length, loss_on=s.loss_on, overflow=s.overflow,
                                  packing=False, enable_thinking=s.enable_thinking, pixels="processor")
    loader = DataLoader(expert, batch_size=settings.sft_batch_size or config.per_device_train_batch_size,
                        shuffle=True, collate_fn=collator, generator=torch.Generator().manual_seed(config.data_seed))
    trainer, skips, _ = build_grpo(config, model, processor, family, callbacks, trainer_cls=ChordTrainer,
                                   section="grpo", cls=GRPOConfig, chord=settings, expert_loader=loader)
    return trainer, skips, collator.stats
