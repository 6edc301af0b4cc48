"""CLI for inference: `vlmgraft chat`, `vlmgraft detect`, `vlmgraft serve` and `vlmgraft webui`."""

from __future__ import annotations

import argparse
import os
import sys


def _add_model_args(parser) -> None:
    parser.add_argument("model", help="model folder (a graft, trained or merged model)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:1, mps, cpu")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp16 on MPS, fp32 on CPU) or a dtype")


def _add_think_args(parser) -> None:
    parser.add_argument("--think", dest="think", action="store_true", default=None,
                        help="turn the LLM's thinking on (templates with an enable_thinking switch, e.g. Qwen3; "
                             "default: what the model was trained with, else the template's default)")
    parser.add_argument("--no-think", dest="think", action="store_false", help="turn the LLM's thinking off")


def register(sub) -> None:
    chat = sub.add_parser("chat", help="talk to a model (one question with --prompt, else an interactive session)")
    _add_model_args(chat)
    chat.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                      help="image for the first message (repeatable)")
    chat.add_argument("--prompt", help="ask this one question, print the answer and exit")
    chat.add_argument("--system", help="system prompt")
    _add_think_args(chat)
    chat.add_argument("--temperature", type=float, help="0 = greedy (default: the model's generation config)")
    chat.add_argument("--top-p", type=float)
    chat.add_argument("--top-k", type=int)
    chat.add_argument("--max-new-tokens", type=int, default=1024)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--json", action="store_true",
                      help="with --prompt: print one JSON object (answer, reasoning, tokens, seconds)")
    chat.add_argument("--allow-remote-images", action="store_true", help="allow http(s) image URLs")
    chat.set_defaults(func=_chat)

    detect = sub.add_parser("detect", help="find objects of given classes and draw their boxes")
    _add_model_args(detect)
    detect.add_argument("--image", required=True, help="image file (or URL with --allow-remote-images)")
    detect.add_argument("--classes", required=True, help="comma-separated class names, e.g. 苹果,狗 or apple,dog")
    detect.add_argument("--lang", choices=["zh", "en"], help="prompt language (default: zh for CJK class names)")
    detect.add_argument("--out", help="write the image with labelled boxes to this PNG")
    detect.add_argument("--json", action="store_true", help="print the boxes (pixel coordinates) as JSON")
    detect.add_argument("--max-new-tokens", type=int, default=512)
    detect.add_argument("--allow-remote-images", action="store_true")
    detect.set_defaults(func=_detect)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with dynamic batching")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("VLMGRAFT_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $VLMGRAFT_API_KEY)")
    serve.add_argument("--served-model-name", help="model id clients use (default: the folder name)")
    serve.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    serve.add_argument("--allow-local-files", action="store_true", help="read file:// URLs and local paths")
    serve.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together")
    serve.add_argument("--max-model-len", type=int, default=4096, help="prompt + answer tokens per sequence")
    serve.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024, help="bytes of one image file")
    serve.add_argument("--max-images-per-request", type=int, default=16,
                       help="image parts in one request (default: 16); the body limit grows with it")
    serve.add_argument("--max-request-pixels", type=int, default=64_000_000,
                       help="pixels of all images of one request together, read from their headers before decoding "
                            "(default: 64000000)")
    serve.add_argument("--max-pending-bytes", type=int, default=1 << 30,
                       help="bytes of request bodies read and decoded at once; more gets 503 (default: 1 GiB)")
    serve.add_argument("--batch-window-ms", type=float, default=10.0,
                       help="how long an idle server waits for more requests to prefill together")
    serve.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                       help="run decode steps eagerly on CUDA (debugging)")
    serve.add_argument("--compile", action="store_true",
                       help="torch.compile the decode step of small batches (faster batch-1 decode; minutes of warm-up)")
    _add_think_args(serve)
    serve.set_defaults(func=_serve)

    webui = sub.add_parser("webui", help="a page to try a model in the browser: chat with images, and detection")
    _add_model_args(webui)
    webui.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    webui.add_argument("--port", type=int, default=7860)
    webui.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024, help="largest upload accepted")
    webui.add_argument("--max-batch-size", type=int, default=8, help="questions from several pages decoded together")
    webui.add_argument("--max-model-len", type=int, default=4096, help="prompt + answer tokens per conversation")
    webui.add_argument("--max-new-tokens", type=int, default=1024)
    _add_think_args(webui)
    webui.set_defaults(func=_webui)


def _chat(args) -> int:
    from vlmgraft.infer.chat import ChatOptions, run_chat

    return run_chat(ChatOptions(model=args.model, images=args.image, prompt=args.prompt, system=args.system,
                                think=args.think, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_new_tokens=args.max_new_tokens, seed=args.seed, json=args.json,
                                device=args.device, dtype=args.dtype, allow_remote_images=args.allow_remote_images))


def _detect(args) -> int:
    import json

    from vlmgraft.errors import VlmgraftError
    from vlmgraft.images import ImageError, ImagePolicy, load_image
    from vlmgraft.infer.detect import detect, draw_boxes
    from vlmgraft.infer.model import load_for_inference

    classes = [c.strip() for c in args.classes.replace("，", ",").split(",") if c.strip()]
    if not classes:
        raise VlmgraftError("--classes is empty: give comma-separated names such as 苹果,狗")
    try:
        image = load_image(args.image, ImagePolicy(allow_remote=args.allow_remote_images, allow_local=True))
    except ImageError as err:
        raise VlmgraftError(f"--image {args.image!r}: {err}") from err
    model, processor = load_for_inference(args.model, args.device, args.dtype)
    found = detect(model, processor, image, classes, args.lang, args.max_new_tokens)
    if args.out:
        draw_boxes(found.image, found.boxes).save(args.out, format="PNG")
    if args.json:
        print(json.dumps({"image": args.image, "width": found.width, "height": found.height, "classes": classes,
                          "parsed": found.parsed, "boxes": found.boxes, "raw": found.raw}, ensure_ascii=False))
    else:
        for item in found.boxes:
            print(f"{item['label']}\t{item['box']}")
        if not found.boxes:
            print("no boxes" if found.parsed else "the answer held no box list", file=sys.stderr)
        if args.out:
            print(f"saved {args.out}", file=sys.stderr)
    if not found.parsed:
        print(f"raw answer: {found.raw[:500]!r}", file=sys.stderr)
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    from vlmgraft.errors import require_extra

    require_extra("vlmgraft serve", "serve", "fastapi", "uvicorn")
    from vlmgraft.infer.serve import ServeOptions, run

    run(ServeOptions(model=args.model, host=args.host, port=args.port, api_key=args.api_key,
                     allow_remote_images=args.allow_remote_images, allow_local_files=args.allow_local_files,
                     max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
                     max_image_bytes=args.max_image_bytes, max_images_per_request=args.max_images_per_request,
                     max_request_pixels=args.max_request_pixels, max_pending_bytes=args.max_pending_bytes,
                     served_model_name=args.served_model_name,
                     device=args.device, dtype=args.dtype, cuda_graphs=args.cuda_graphs, compile=args.compile,
                     batch_window_ms=args.batch_window_ms, think=args.think))
    return 0


def _webui(args: argparse.Namespace) -> int:
    from vlmgraft.infer.webui import WebuiOptions, run

    run(WebuiOptions(model=args.model, host=args.host, port=args.port, max_image_bytes=args.max_image_bytes,
                     max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
                     max_new_tokens=args.max_new_tokens, think=args.think, device=args.device, dtype=args.dtype))
    return 0
