"""Training speed switches that change no result (beyond float rounding): attention kernels, regional compilation,
CUDA graphs and two kernel substitutions in the vision tower.

Attention (`attn_implementation: auto`): packed rows (`data_settings.packing`) hold several samples that must not
see each other. transformers derives that block-diagonal mask from the position resets; with SDPA it becomes a dense
mask that takes SDPA off its flash kernel (bench/bench_train.py --packing compares them), while flex attention's
block mask skips the blocks between samples. So on CUDA a packed run uses
flex attention in the LLM and SDPA in the vision tower (whose tiles never mix); elsewhere SDPA (flex attention has
no CPU backward). A batch in which no two samples share a row (image-heavy samples: a 17-tile one is ~1,400 of a
2048-token row) needs no block mask, and goes through SDPA's causal kernel instead (`sdpa_for_unpacked_rows`).

Compilation (`compile`, on by default on CUDA): every repeated block (LLM decoder layers, vision encoder layers) and
the connector is compiled on its own, in place. Identical blocks share one compiled graph, so compiling costs one
block's time instead of the whole model's, and a new sequence length recompiles one small graph once (then shapes go
dynamic). A vision tower that trains nothing (`align`) is compiled whole instead (patch embeddings, encoder and
post-norm as one graph, `image_inputs.compile_frozen_tower`), for the fusion across layers.
transformers' `TrainingArguments.torch_compile` compiles the whole model as one graph instead, and parameter names
would gain an `_orig_mod.` prefix; an in-place `Module.compile()` keeps checkpoints and PEFT adapters unchanged.

CUDA graphs (`cuda_graphs`, off by default): inductor replays each compiled region as one CUDA graph instead of
launching its kernels from Python one by one: at small batches the GPU otherwise waits on those launches. But a
graph is recorded per input shape, and a recording is keyed on the graphs replayed before it in the step, so every
new combination of tile count and row lengths records a new chain, and images of mixed aspect ratios keep a run
recording (bench/bench_train_run.py --cuda-graphs [--image-sizes mixed]). So it is a switch for data whose batches
keep one shape. `mark_cuda_graph_step`
keeps a step's regions in one generation of graph memory and gradient accumulation correct.

Patch embedding (on CUDA): a Conv2d whose stride equals its kernel is a matrix product over non-overlapping
patches, but cuDNN runs it with a slow implicit-GEMM kernel (bench/bench_train.py --patchify --profile FILE shows
it). `patchify_with_matmul` computes the same
product with one reshape and one `F.linear` on the module's own weights, so nothing changes in the checkpoint.

Vision MLP (on CUDA, frozen layers): the GELU after fc1 runs as its own memory-bound kernel over the whole
(tiles×1024, 3072) activation (bench/bench_train.py --fuse-gelu --profile FILE). `fuse_mlp_gelu` has the
matmul apply bias and GELU in its epilogue. The MLP's activation is tanh-GELU, which is what cuBLASLt computes there.
"""

from __future__ import annotations

import contextlib
import logging
import types
import weakref

import torch
import torch.nn.functional as F

from vlmgraft.errors import VlmgraftError
from vlmgraft.graft.families import DonorFamily
from vlmgraft.model.common import text_config, unwrap_model
from vlmgraft.train.image_inputs import compile_frozen_tower

log = logging.getLogger(__name__)
FLEX = "flex_attention"
# transformers accepts one implementation per sub-config; "" is the outer model.
FLEX_TEXT = {"": "sdpa", "vision_config": "sdpa", "text_config": FLEX}


def attention_for(requested: str, packing: bool, cuda: bool | None = None) -> str | dict[str, str]:
    """The `attn_implementation` argument for from_pretrained."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested == "auto":
        return FLEX_TEXT if cuda and packing else "sdpa"
    if requested == FLEX and not cuda:
        raise VlmgraftError("attn_implementation: flex_attention trains only on CUDA (PyTorch's flex attention has "
                            "no CPU backward); use sdpa or auto")
    return requested


def compile_by_default() -> bool:
    """`compile` left unset: on where inductor can build GPU kernels (CUDA, Triton installed, compute capability
    7.0 or newer); elsewhere the layers stay eager rather than failing at the first step."""
    import importlib.util

    return (torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
            and torch.cuda.get_device_capability() >= (7, 0))


def compile_enabled(setting: bool | None) -> bool:
    """The `compile` setting resolved: as given, or `compile_by_default()` when unset."""
    return compile_by_default() if setting is None else setting


def cuda_graphs_enabled(setting: bool, compiled: bool) -> bool:
    """The `cuda_graphs` setting, checked: there is nothing to replay unless the layers compile on CUDA."""
    if setting and not (compiled and torch.cuda.is_available()):
        raise VlmgraftError("config key 'cuda_graphs': true replays the compiled layers, so it needs compile on a "
                            "CUDA GPU; set cuda_graphs: false")
    return setting


def compiled_regions(model, family: DonorFamily) -> list[torch.nn.Module]:
    """The modules `compile_regions` compiles in place: each LLM decoder layer, the vision encoder (whole when nothing
    in it trains, else layer by layer) and the connector."""
    base = unwrap_model(model)
    encoder = base.get_submodule(family.vision_layers.rpartition(".")[0])
    frozen = not any(p.requires_grad for p in encoder.parameters())
    vision = [encoder] if frozen else list(base.get_submodule(family.vision_layers))
    return [*base.get_submodule(family.llm_layers), *vision, base.get_submodule(family.connector)]


def compile_regions(model, family: DonorFamily) -> int:
    """Compile the regions of `compiled_regions` in place, and a vision tower that trains nothing as one more graph
    (`compile_frozen_tower`: embeddings, encoder and post-norm, which the training step's image path runs; the
    encoder region serves transformers' own path). Returns how many. A frozen encoder is whole because inductor
    then fuses each layer's last residual add into the next layer's first norm (one pass over the (tiles×1024, 768)
    activations instead of two, per layer); a trained layer's backward needs the layer boundary kept anyway. The
    connector's pixel shuffle is two permuted copies of the vision output when eager, one compiled."""
    blocks = compiled_regions(model, family)
    # All blocks of one type share one code object and so one cache of compiled graphs: a static and a dynamic
    # graph for training, the same again for evaluation (no grad), per block type.
    config = torch._dynamo.config
    config.cache_size_limit = max(config.cache_size_limit, 16)
    for block in blocks:
        block.compile()
    count = len(blocks) + compile_frozen_tower(model)
    log.info("compiled %d regions (regional torch.compile; the first steps include compilation)", count)
    return count


def _patchify_forward(self, pixels: torch.Tensor) -> torch.Tensor:
    k = self.kernel_size[0]
    n, c, h, w = pixels.shape
    rows, cols = h // k, w // k
    patches = pixels[:, :, : rows * k, : cols * k].reshape(n, c, rows, k, cols, k).permute(0, 2, 4, 1, 3, 5)
    out = F.linear(patches.reshape(n, rows * cols, c * k * k), self.weight.reshape(self.out_channels, -1), self.bias)
    return out.transpose(1, 2).reshape(n, self.out_channels, rows, cols)


def patchify_with_matmul(model, family: DonorFamily) -> bool:
    """Run the vision patch embedding as reshape + matmul (same weights, same result); False when it does not fit."""
    base = unwrap_model(model)
    conv = base.get_submodule(family.vision_patch_embedding)
    fits = (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size[0] == conv.kernel_size[1] == conv.stride[0]
            == conv.stride[1] and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding in ("valid", (0, 0)))
    if fits:
        conv.forward = types.MethodType(_patchify_forward, conv)
    return fits


def _fused_mlp_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    fc1 = self.fc1
    if torch.is_grad_enabled() and (hidden.requires_grad or fc1.weight.requires_grad):
        return self.fc2(self.activation_fn(fc1(hidden)))  # a trained layer: the autograd-aware path
    flat = hidden.reshape(-1, hidden.shape[-1]).to(fc1.weight.dtype)
    inner = torch._addmm_activation(fc1.bias, flat, fc1.weight.t(), use_gelu=True)
    return self.fc2(inner.reshape(*hidden.shape[:-1], inner.shape[-1]))


def fuse_mlp_gelu(model, family: DonorFamily) -> int:
    """In vision layers that need no gradient, compute fc1's bias and tanh-GELU inside the matmul (cuBLASLt's GELU
    epilogue, which PyTorch exposes as `_addmm_activation`; inductor keeps it as one kernel). Returns how many MLPs
    were switched; CUDA only: on CUDA `_addmm_activation` applies the tanh GELU, elsewhere the exact one."""
    probe = torch.linspace(-6, 6, 97)
    switched = 0
    for layer in unwrap_model(model).get_submodule(family.vision_layers):
        mlp = getattr(layer, "mlp", None)
        fits = (mlp is not None and isinstance(getattr(mlp, "fc1", None), torch.nn.Linear)
                and mlp.fc1.bias is not None and isinstance(getattr(mlp, "fc2", None), torch.nn.Module)
                and callable(getattr(mlp, "activation_fn", None))
                and torch.equal(mlp.activation_fn(probe), F.gelu(probe, approximate="tanh")))
        if fits:
            mlp.forward = types.MethodType(_fused_mlp_forward, mlp)
            switched += 1
    return switched


@contextlib.contextmanager
def sdpa_for_unpacked_rows(model, inputs: dict):
    """Within it, a flex-attention LLM attends with SDPA when the batch has no packed rows (the collator then sends
    no `position_ids`): at the training shapes cuDNN's causal SDPA kernel beats flex attention
    (bench/bench_attention.py). Hold it over the whole training step, backward included: a checkpointed layer runs
    its forward again there and must attend the same way. Compiled layers compile once more for the other attention
    and keep both graphs."""
    config = text_config(model)
    if "position_ids" in inputs or getattr(config, "_attn_implementation", None) != FLEX:
        yield
        return
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = FLEX


_TRAINED_PARAMETERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mark_cuda_graph_step(model=None) -> None:
    """Where a step (a micro-batch) begins when inductor replays compiled regions as CUDA graphs (`cuda_graphs`);
    nothing otherwise. Every compiled region is a torch.compile call of its own, and for regions that run without
    gradients (the tile normalisation, a frozen tower) each call would start a new generation of graph memory and
    free the outputs of the region before it, which the next region is about to read. Given the model (training),
    the trained parameters also get zeroed `.grad` buffers outside the graphs' memory where they have none: a
    gradient that a compiled backward hands over lives in that memory, which the next micro-batch's graphs
    overwrite, so gradient accumulation would read overwritten values; with a buffer in place autograd adds into it.
    The trained parameters are listed once per model (a stage fixes them before training starts)."""
    if not torch._inductor.config.triton.cudagraphs:
        return
    torch.compiler.cudagraph_mark_step_begin()
    if model is not None:
        trained = _TRAINED_PARAMETERS.get(model)
        if trained is None:
            trained = _TRAINED_PARAMETERS[model] = [p for p in model.parameters() if p.requires_grad]
        for param in trained:
            if param.grad is None:
                param.grad = torch.zeros_like(param)


@contextlib.contextmanager
def settings_for_generation(model):
    """Generate answers mid-training with SDPA and without the compiled layers. Cached decoding would rebuild a flex
    block mask at every new token for nothing (one sample per row), and would recompile every layer for the new
    shapes and the cache object (one graph per layer index, minutes at the first sample callback)."""
    base = unwrap_model(model)
    configs = [c for c in (base.config, getattr(base.config, "text_config", None),
                           getattr(base.config, "vision_config", None))
               if c is not None and c._attn_implementation == FLEX]
    for config in configs:
        config._attn_implementation = "sdpa"
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        for config in configs:
            config._attn_implementation = FLEX
