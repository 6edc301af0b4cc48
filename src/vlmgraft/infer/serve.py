"""Assemble the server from a model folder and options, and run it with uvicorn."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vlmgraft.errors import VlmgraftError
from vlmgraft.images import DEFAULT_MAX_IMAGE_BYTES, ImagePolicy
from vlmgraft.infer.limits import (
    DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_PENDING_BYTES,
    DEFAULT_MAX_REQUEST_PIXELS,
    RequestLimits,
)

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allow_remote_images: bool = False
    allow_local_files: bool = False
    max_batch_size: int = 32
    max_model_len: int = 4096
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_images_per_request: int = DEFAULT_MAX_IMAGES
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES
    served_model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    cuda_graphs: bool = True
    compile: bool = False
    batch_window_ms: float = 10.0
    sync_every: int = 8
    think: bool | None = None  # None: what the model was trained with (requests may still say otherwise)


def sampling_defaults(model, max_tokens: int):
    """The model's generation config decides what an unset temperature/top_p/top_k means."""
    from vlmgraft.infer.sampling import SamplingParams, model_sampling_defaults

    return SamplingParams(**model_sampling_defaults(model), max_new_tokens=max_tokens)


def build_app(options: ServeOptions, model=None, processor=None):
    """The FastAPI app (engine worker not yet started: uvicorn's lifespan starts and stops it)."""
    import torch

    from vlmgraft.infer.engine import Engine, EngineConfig
    from vlmgraft.infer.model import load_for_inference
    from vlmgraft.infer.prompts import default_thinking
    from vlmgraft.infer.server import ServerState, create_app
    from vlmgraft.infer.worker import EngineWorker

    if options.max_batch_size < 1 or options.max_model_len < 64:
        raise VlmgraftError("--max-batch-size must be >= 1 and --max-model-len >= 64")
    if options.max_images_per_request < 0 or options.max_request_pixels < 1 or options.max_pending_bytes < 1:
        raise VlmgraftError("--max-images-per-request must be >= 0, --max-request-pixels and --max-pending-bytes >= 1")
    if model is None:
        model, processor = load_for_inference(options.model, options.device, options.dtype)
    config = EngineConfig(max_batch_size=options.max_batch_size, max_seq_len=options.max_model_len,
                          cuda_graphs=options.cuda_graphs, compile=options.compile, sync_every=options.sync_every)
    try:
        engine = Engine(model, processor.tokenizer, config)
    except torch.cuda.OutOfMemoryError as err:
        raise VlmgraftError(f"the key/value cache for --max-batch-size {options.max_batch_size} x --max-model-len "
                            f"{options.max_model_len} does not fit in device memory; lower one of them") from err
    log.info("KV cache: %.2f GiB for %d slots x %d tokens", engine.cache.nbytes / 2**30, options.max_batch_size,
             options.max_model_len)
    if engine.device.type == "cuda":
        print("warming up (capturing CUDA graphs" + (", compiling" if options.compile else "") + ") ...", flush=True)
        engine.warmup()
    worker = EngineWorker(engine, processor.tokenizer, batch_window_s=options.batch_window_ms / 1000)
    think = default_thinking(processor, options.model, options.think)
    name = options.served_model_name or Path(options.model).name or options.model
    state = ServerState(model_id=name, processor=processor, worker=worker,
                        image_policy=ImagePolicy(allow_remote=options.allow_remote_images,
                                                 allow_local=options.allow_local_files,
                                                 max_bytes=options.max_image_bytes),
                        api_key=options.api_key, defaults=sampling_defaults(model, 1024),
                        aliases=(options.model,), device=str(engine.device),
                        template_defaults={} if think is None else {"enable_thinking": think},
                        # every image as base64 at its byte limit, plus the text
                        max_body_bytes=max(1, options.max_images_per_request) * options.max_image_bytes * 4 // 3
                        + 2**20,
                        limits=RequestLimits(max_images=options.max_images_per_request,
                                             max_pixels=options.max_request_pixels,
                                             max_pending_bytes=options.max_pending_bytes))
    return create_app(state)


def run(options: ServeOptions) -> None:
    import uvicorn

    app = build_app(options)
    if options.host not in ("127.0.0.1", "localhost", "::1") and not options.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model",
                    options.host)
    print(f"serving {app.state.vlmgraft.model_id!r} on http://{options.host}:{options.port}/v1 "
          f"({app.state.vlmgraft.device})", flush=True)
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
