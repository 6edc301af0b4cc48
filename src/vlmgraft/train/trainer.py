"""`GraftTrainer`: the transformers Trainer with four changes that matter for grafted VLMs.

1. Logits and cross-entropy only at positions that carry a label. A Cauldron-like sample is ~1100 image tokens and
   a short answer; full-vocabulary logits at every position (151,936 × seq) dominate memory and time otherwise.
   The stock model already supports this through `logits_to_keep` with an index tensor, so no forward is rewritten.
2. Per-module-group learning rates and LoRA+ through `create_optimizer`.
3. Right-padded batches go without an attention mask (the causal mask already hides the padding), so SDPA keeps
   its flash kernel; rows of one sample each also skip transformers' check for packed rows, a GPU read per step,
   and run SDPA even in a packed run whose LLM otherwise attends with flex attention.
4. The does-it-see probe: at each evaluation, the eval loss with the real images vs. the same batches with the
   images replaced by noise. A graft whose images never reach the LLM shows a gap of ~0 — the classic silent failure.

Two more things the stock Trainer gets wrong for this data. A micro-batch whose samples were all skipped (unreadable
images, no loss token) arrives as `{}`: it is skipped and counted in `empty_batches` in training, evaluation and the
probe, at any batch size and gradient accumulation. And the eval loss (and the probe's) is weighted by label tokens
like the training loss, not a mean of per-batch means.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback

from vlmgraft.data.collate import LossPlan
from vlmgraft.data.encode import IGNORE
from vlmgraft.errors import VlmgraftError
from vlmgraft.graft.families import DonorFamily
from vlmgraft.model.common import text_config, unwrap_model
from vlmgraft.model.images import image_path_for
from vlmgraft.train.callbacks import ProgressWithRates
from vlmgraft.train.config import TrainConfig
from vlmgraft.train.image_inputs import to_device_nonblocking
from vlmgraft.train.speed import compile_enabled, mark_cuda_graph_step, sdpa_for_unpacked_rows
from vlmgraft.train.stages import GroupOptimizer

log = logging.getLogger(__name__)


def drop_right_padding_mask(inputs: dict) -> dict:
    """Right-padded rows need no attention mask in causal training: a real token attends only to earlier positions,
    and the padding comes after every real token, so the causal mask alone hides it (the padding's own outputs carry
    no label). Without the mask SDPA runs its flash kernel (is_causal) instead of the slower masked kernel."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2 or not bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return inputs  # left padding or holes: keep the mask
    return {k: v for k, v in inputs.items() if k != "attention_mask"}


def causal_only_masks(model) -> dict | None:
    """The LLM's mask mapping for rows of one sample each under SDPA: no mask, SDPA's own causal flag. Without it
    transformers builds the mask itself and, finding no attention mask, checks the positions for packed rows with
    an `if` on a GPU value: the CPU waits there each step until the vision tower has run. None where the causal
    flag alone would be wrong (eager attention needs a real mask, sliding-window layers need theirs)."""
    config = text_config(model)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "_attn_implementation", None) != "sdpa" or kinds != {"full_attention"}:
        return None
    return {"full_attention": None}


def label_only_loss(model, inputs: dict, num_items_in_batch=None, padding_mask: bool = False
                    ) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions / the item count; returns (loss, labelled tokens).
    A right-padding attention mask is dropped unless `padding_mask` (see `drop_right_padding_mask`). With the
    collator's `loss_plan` nothing is read back from the GPU; without one the same values are computed here."""
    inputs = dict(inputs)
    plan: LossPlan | None = inputs.pop("loss_plan", None)
    if not padding_mask:
        if plan is not None:  # the collator's rows are always right-padded
            inputs.pop("attention_mask", None)
        else:
            inputs = dict(drop_right_padding_mask(inputs))
    labels = inputs.pop("labels")
    targets_all = labels[:, 1:]
    if plan is not None and inputs.get("pixel_values") is not None:
        path = image_path_for(model)
        embeds = path.train_embeddings(model, inputs, plan)
        if embeds is not None:
            for key in ("input_ids", *path.pixel_keys):
                inputs.pop(key, None)
            inputs["inputs_embeds"] = embeds
    if plan is not None and "position_ids" not in inputs and inputs.get("attention_mask") is None:
        masks = causal_only_masks(unwrap_model(model))  # rows are one sample each: packed rows carry positions
        if masks is not None:
            inputs["attention_mask"] = masks
    if plan is not None:
        keep = to_device_nonblocking(torch.tensor(plan.columns or (0,), dtype=torch.long), labels.device)
    else:
        keep = (targets_all != IGNORE).any(0).nonzero().squeeze(1)
        if keep.numel() == 0:  # nothing to learn in this batch: a zero loss that still touches the graph
            keep = torch.zeros(1, dtype=torch.long, device=labels.device)
    outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
    logits = outputs.logits
    targets = targets_all[:, keep]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    count = plan.label_tokens if plan is not None else int((targets != IGNORE).sum())
    denominator = num_items_in_batch if num_items_in_batch is not None else max(count, 1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(loss.device)
    return loss / denominator, count


def noise_like_images(pixel_values: torch.Tensor) -> torch.Tensor:
    """Uniform noise in the normalised pixel range, keeping SmolVLM's all-zero padding tiles zero (the model drops
    them); other families' pixels (LLaVA's images, Exaone's patches) have no padding and all become noise."""
    if pixel_values.dim() != 5:
        return torch.rand_like(pixel_values) * 2 - 1
    real = pixel_values.flatten(2).abs().sum(-1) > 0
    noise = torch.rand_like(pixel_values) * 2 - 1
    return torch.where(real[..., None, None, None], noise, torch.zeros_like(pixel_values))


def refuse_data_parallel(n_gpu: int) -> None:
    """The Trainer wraps a model in `torch.nn.DataParallel` when one process sees several GPUs. DataParallel splits
    every tensor argument of the forward along dimension 0, the 1-D `logits_to_keep` index of labelled columns
    included, so each replica would score other columns than its rows' labels; the image features are placed outside
    the forward and would not be split at all."""
    if n_gpu > 1:
        raise VlmgraftError(f"this process sees {n_gpu} GPUs but was not launched distributed, so the Trainer would "
                            f"use torch.nn.DataParallel, which vlmgraft does not support (it would split the index "
                            f"of labelled positions across GPUs). Start one process per GPU: torchrun "
                            f"--nproc_per_node {n_gpu} -m vlmgraft.cli train CONFIG.yaml, or train on one GPU "
                            f"with CUDA_VISIBLE_DEVICES=0.")


class GraftTrainer(GroupOptimizer, Trainer):
    def __init__(self, *args, family: DonorFamily, graft_config: TrainConfig, probe_batches: int = 4, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:  # before the Trainer places the model on the GPUs
            refuse_data_parallel(training_args.n_gpu)
        super().__init__(*args, **kwargs)
        if any(type(c) is ProgressCallback for c in self.callback_handler.callbacks):  # not in notebooks
            self.remove_callback(ProgressCallback)
            self.add_callback(ProgressWithRates())
        self.family = family
        self.graft_config = graft_config
        self.probe_batches = probe_batches
        self._tokens = 0
        self._samples = 0
        self._window_start = time.perf_counter()
        self.vision_gaps: list[tuple[int, float]] = []
        self._tiles_stream: torch.cuda.Stream | None = None  # made at the first CUDA batch
        self._fused_normalize = compile_enabled(graft_config.compile)
        self._parameter_count: tuple | None = None  # (model, count) for floating_point_ops
        self.empty_batches: Counter = Counter()  # micro-batches whose samples were all skipped, by phase
        self._eval_sum = self._eval_tokens = 0.0  # summed label-token loss and label tokens of one evaluation

    # -- loss ---------------------------------------------------------------------------------------------------
    def _prepare_inputs(self, inputs):
        if not inputs:  # every sample was skipped; the Trainer would raise on an empty batch
            return inputs
        # uint8 tiles (the collator's fast path) are normalised on the device, not in the DataLoader workers.
        if not isinstance(inputs.get("pixel_values", None), (torch.Tensor, type(None))):
            dtype = torch.bfloat16 if self.args.bf16 else None
            inputs = self.data_collator.to_device(inputs, self.args.device, dtype, copy_stream=self._copy_stream(),
                                                  fused=self._fused_normalize)
        return super()._prepare_inputs(inputs)

    def _copy_stream(self) -> torch.cuda.Stream | None:
        if self.args.device.type != "cuda":
            return None
        if self._tiles_stream is None:
            self._tiles_stream = torch.cuda.Stream(self.args.device)
        return self._tiles_stream

    def _get_num_items_in_batch(self, batch_samples: list, device):
        # The label tokens of one optimiser step, over its non-empty micro-batches: the stock count reads "labels"
        # from every batch, and decides from the first one alone whether to count at all.
        real = [b for b in batch_samples if b]
        if not real and self.args.world_size > 1:
            real = [{"labels": torch.full((1, 1), IGNORE)}]  # zero items, still gathered with the other processes
        return super()._get_num_items_in_batch(real, device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not inputs:
            self.empty_batches["train"] += 1
            if self.args.world_size == 1:  # nothing to learn and no other process to keep in step with
                return torch.zeros((), device=self.args.device)
            inputs = self._stand_in_batch()
        mark_cuda_graph_step(model)
        with sdpa_for_unpacked_rows(model, inputs):
            return super().training_step(model, inputs, num_items_in_batch)

    def _stand_in_batch(self) -> dict:
        """One padding token without a label, for a process whose micro-batch is empty while the others train: it
        must still run the wrapped forward and a backward, or the others wait in the gradient all-reduce."""
        pad = getattr(self.processing_class, "tokenizer", self.processing_class).pad_token_id or 0
        return {"input_ids": torch.full((1, 1), pad), "labels": torch.full((1, 1), IGNORE), "stand_in": True}

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not inputs:
            self.empty_batches["eval"] += 1
            return None, None, None
        mark_cuda_graph_step()
        if not prediction_loss_only:
            with sdpa_for_unpacked_rows(model, inputs):
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager(), sdpa_for_unpacked_rows(model, inputs):
            loss, count = self._label_only_loss(model, inputs)
        loss = loss.detach()
        self._eval_sum += loss * count  # summed on the device: no read-back per batch
        self._eval_tokens += count
        return loss, None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        """The stock loop, with `{prefix}_loss` weighted by label tokens over all processes: the stock value repeats
        each batch's mean loss `eval_batch_size` times, so a batch with few answer tokens counts as much as one
        with many, and checkpoints were picked by a different loss than the one trained."""
        self._eval_sum = self._eval_tokens = 0.0
        empty_before = self.empty_batches["eval"]
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        prediction_loss_only = self.args.prediction_loss_only if prediction_loss_only is None else prediction_loss_only
        if prediction_loss_only:
            totals = torch.tensor([float(self._eval_sum), float(self._eval_tokens)], device=self.args.device)
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            total, tokens = totals.tolist()
            if not tokens:
                log.warning(f"{description}: no label token in any batch ({self.empty_batches['eval'] - empty_before} "
                            f"empty batches: all their samples were skipped); {metric_key_prefix}_loss is NaN")
            output.metrics[f"{metric_key_prefix}_loss"] = total / tokens if tokens else float("nan")
        if self.empty_batches["eval"] > empty_before:
            output.metrics[f"{metric_key_prefix}_empty_batches"] = self.empty_batches["eval"] - empty_before
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if inputs.get("stand_in"):  # see _stand_in_batch: a zero loss on every trained parameter
            inputs = {k: v for k, v in inputs.items() if k != "stand_in"}
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits
            loss = logits.sum() * 0.0 + sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            return (loss, {"loss": loss}) if return_outputs else loss
        if model.training:
            self._count(inputs)
        loss, _ = self._label_only_loss(model, inputs, num_items_in_batch)
        if model.training and not loss.requires_grad:  # e.g. a text-only batch while only the connector trains
            loss = loss + sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # the item count was summed over processes
        return (loss, {"loss": loss}) if return_outputs else loss

    def _label_only_loss(self, model, inputs, num_items_in_batch=None):
        # The Trainer autocasts inside model.forward only (accelerate wraps it); the image path of label_only_loss
        # runs the vision tower and connector before that call, so it needs the same autocast around it.
        with self.accelerator.autocast():
            return label_only_loss(model, inputs, num_items_in_batch)

    def _count(self, inputs) -> None:
        plan = inputs.get("loss_plan")
        if plan is not None:  # counted by the collator on the CPU: nothing to read back from the GPU
            self._tokens += plan.tokens
            self._samples += plan.samples
        else:  # a batch from another collator: rows and padded tokens
            self._tokens += inputs["input_ids"].numel()
            self._samples += inputs["input_ids"].shape[0]

    # -- logging ------------------------------------------------------------------------------------------------
    def floating_point_ops(self, inputs: dict) -> int:
        # The Trainer's estimate (6 × input tokens × non-embedding parameters, summed into `total_flos`) counts the
        # model's parameters again at every step, host time that small batches wait on (bench/bench_train_run.py).
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._parameter_count is None or self._parameter_count[0] is not self.model:
            self._parameter_count = (self.model, self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * self._parameter_count[1]

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            elapsed = max(time.perf_counter() - self._window_start, 1e-9)
            logs["samples_per_second"] = round(self._samples / elapsed, 2)
            logs["tokens_per_second"] = round(self._tokens / elapsed, 1)
            if self.empty_batches["train"]:
                logs["empty_batches"] = self.empty_batches["train"]  # so far in the run
            self._tokens = self._samples = 0
            self._window_start = time.perf_counter()
        super().log(logs, start_time)

    # -- the does-it-see probe ----------------------------------------------------------------------------------
    @torch.no_grad()
    def vision_gap(self, dataset=None) -> dict:
        loader = self.get_eval_dataloader(dataset)
        model = self.model
        was_training = model.training
        model.eval()
        real = noise = 0.0
        batches = tokens = 0
        for batch in loader:
            if batches >= self.probe_batches:
                break
            if not batch:
                self.empty_batches["probe"] += 1
                continue
            mark_cuda_graph_step()
            batch = self._prepare_inputs(batch)
            if "pixel_values" not in batch:
                continue
            with self.compute_loss_context_manager(), sdpa_for_unpacked_rows(model, batch):
                loss, count = self._label_only_loss(model, batch)
                real += loss * count  # token-weighted, as training and evaluation are
                noisy = dict(batch, pixel_values=noise_like_images(batch["pixel_values"]))
                noise += self._label_only_loss(model, noisy)[0] * count
            batches, tokens = batches + 1, tokens + count
        model.train(was_training)
        if not tokens:
            return {}
        result = {"probe_loss_real_images": float(real) / tokens, "probe_loss_noise_images": float(noise) / tokens}
        result["vision_gap"] = result["probe_loss_noise_images"] - result["probe_loss_real_images"]
        return result

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        probe = self.vision_gap(eval_dataset)
        if probe:
            probe = {f"{metric_key_prefix}_{k}": v for k, v in probe.items()}
            self.log(probe)
            metrics.update(probe)
            gap = probe[f"{metric_key_prefix}_vision_gap"]
            self.vision_gaps.append((self.state.global_step, gap))
            self._warn_if_blind(gap)
        return metrics

    def _warn_if_blind(self, gap: float) -> None:
        warmup = self.args.get_warmup_steps(self.state.max_steps) if self.state.max_steps > 0 else 0
        if self.state.global_step > warmup and (abs(gap) < self.graft_config.vision_gap_warn or math.isnan(gap)):
            banner = "!" * 100
            log.warning(f"\n{banner}\nThe model does not seem to use the images: eval loss with noise instead of "
                        f"images is only {gap:+.4f} above the loss with the real images at step "
                        f"{self.state.global_step}.\nCheck the graft (`vlmgraft audit`), the image token id on "
                        f"every config level, and that the connector trains.\n{banner}")
