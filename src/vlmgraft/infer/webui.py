"""`vlmgraft webui`: a gradio page to try a model — a multi-turn image chat and a detection tab.

It runs on the same loading, prompt preparation and batching engine worker as `vlmgraft serve` (CUDA graphs on the
GPU, eager elsewhere), so questions from several open pages are decoded together. Uploads pass the same byte and
pixel limits as `serve`; a bad image or a failed generation is reported in the page and the app keeps running.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from vlmgraft.errors import VlmgraftError, require_extra
from vlmgraft.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, ImageError, ImagePolicy, load_image
from vlmgraft.infer.prompts import ReasoningSplitter, default_thinking, prepare, supports_thinking
from vlmgraft.infer.sampling import SamplingParams


@dataclass
class WebuiOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 7860
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch_size: int = 8
    max_model_len: int = 4096
    max_new_tokens: int = 1024
    detect_max_new_tokens: int = 512
    think: bool | None = None  # None: what the model was trained with
    device: str = "auto"
    dtype: str = "auto"
    sync_every: int = 8


def import_gradio():
    """gradio, or a one-line error naming the extra that installs it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page never phones home
    require_extra("vlmgraft webui", "webui", "gradio")
    import gradio

    return gradio


class Backend:
    """The model behind the page: one engine worker thread that every page's questions go through."""

    def __init__(self, options: WebuiOptions, model=None, processor=None):
        from vlmgraft.infer.engine import Engine, EngineConfig
        from vlmgraft.infer.model import load_for_inference
        from vlmgraft.infer.serve import sampling_defaults
        from vlmgraft.infer.worker import EngineWorker

        if options.max_batch_size < 1 or options.max_model_len < 64:
            raise VlmgraftError("--max-batch-size must be >= 1 and --max-model-len >= 64")
        if model is None:
            model, processor = load_for_inference(options.model, options.device, options.dtype)
        self.options, self.model, self.processor = options, model, processor
        self.engine = Engine(model, processor.tokenizer, EngineConfig(
            max_batch_size=options.max_batch_size, max_seq_len=options.max_model_len, sync_every=options.sync_every))
        if self.engine.device.type == "cuda":
            print("warming up (capturing CUDA graphs) ...", flush=True)
            self.engine.warmup()
        self.worker = EngineWorker(self.engine, processor.tokenizer)
        self.policy = ImagePolicy(allow_remote=False, allow_local=True, max_bytes=options.max_image_bytes,
                                  max_pixels=options.max_pixels)
        self.chat_params = sampling_defaults(model, options.max_new_tokens)
        self.has_thinking_switch = supports_thinking(processor)
        self.think_default = default_thinking(processor, options.model, options.think)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()

    def load_image(self, path: str):
        """An uploaded file → RGB image, under serve's byte and pixel limits."""
        try:
            return load_image(path, self.policy)
        except ImageError as err:
            raise VlmgraftError(f"the image could not be used: {err}") from err

    def _prepare(self, conversation: list[dict], images: list, think: bool | None):
        try:
            return prepare(self.processor, conversation, images, think)
        except Exception as err:  # the template or processor refused this conversation
            raise VlmgraftError(f"the conversation could not be rendered into a prompt: {err}") from err

    def _run(self, prepared: list, params: SamplingParams) -> Iterator[tuple[int, object]]:
        """(index, StreamEvent) for every request as the worker streams; requests left unfinished are cancelled."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        handles = []
        try:
            for index, prompt in enumerate(prepared):
                room = self.engine.prompt_room(len(prompt.input_ids))
                if room < 1:
                    raise VlmgraftError(f"the conversation is {len(prompt.input_ids)} tokens, over this page's "
                                        f"context of {self.engine.config.max_seq_len}; press Clear to start over")
                fitted = replace(params, max_new_tokens=min(params.max_new_tokens, room))
                handles.append(self.worker.submit(prompt, fitted, lambda ev, i=index: events.put((i, ev))))
            open_requests = len(handles)
            while open_requests:
                index, event = events.get()
                if event.error:
                    raise VlmgraftError(f"generation failed: {event.error}")
                open_requests -= bool(event.finish_reason)
                yield index, event
        finally:  # the page went away, or a request failed: free the others' slots
            for handle in handles:
                if not handle.done:
                    self.worker.cancel(handle)

    def chat(self, conversation: list[dict], images: list, think: bool | None) -> Iterator[tuple[str, str]]:
        """(reasoning delta, answer delta) pairs of one streamed reply."""
        prompt = self._prepare(conversation, images, think if self.has_thinking_switch else None)
        splitter = ReasoningSplitter(prompt.opens_thinking)
        for _, event in self._run([prompt], self.chat_params):
            thought, said = splitter.feed(event.delta, final=bool(event.finish_reason))
            if thought or said:
                yield thought, said

    def detect(self, image, classes: list[str]):
        """Boxes of each class, asked as `vlmgraft detect` asks (one greedy question per class, thinking off)."""
        from vlmgraft.infer.detect import collect_detection, detection_conversations

        prepared = [self._prepare(conversation, [image], False if self.has_thinking_switch else None)
                    for conversation in detection_conversations(classes)]
        answers = [""] * len(prepared)
        for index, event in self._run(prepared, SamplingParams(max_new_tokens=self.options.detect_max_new_tokens)):
            answers[index] += event.delta
        return collect_detection(classes, answers, *image.size)


def split_classes(text: str) -> list[str]:
    return [c.strip() for c in (text or "").replace("，", ",").split(",") if c.strip()]


def fresh_conversation() -> dict:
    return {"messages": [], "images": [], "image": None}


class Page:
    """What the page's buttons do; each failure becomes a `gradio.Error`, shown in the page, and the app goes on."""

    def __init__(self, backend: Backend, gr):
        self.backend, self.gr = backend, gr

    def thinking_value(self) -> bool:
        """The checkbox's start: the recorded or explicit choice, else the template's own default (thinking on)."""
        default = self.backend.think_default
        return self.backend.has_thinking_switch and (default is None or default)

    def ask(self, image_path, question, think, history, conversation):
        """Stream one reply: (Answer, Reasoning, History, conversation state) as it grows."""
        question = (question or "").strip()
        if not question:
            raise self.gr.Error("Type a question first.")
        try:
            fresh = image_path and image_path != conversation["image"]  # a picture joins the turn it first shows in
            new = [self.backend.load_image(image_path)] if fresh else []
            user = {"role": "user", "content": [{"type": "image"}] * len(new) + [{"type": "text", "text": question}]}
            shown = [*history, {"role": "user", "content": ("[image] " if new else "") + question}]
            answer = reasoning = ""
            yield answer, reasoning, shown, conversation
            for thought, said in self.backend.chat([*conversation["messages"], user],
                                                   [*conversation["images"], *new], bool(think)):
                reasoning, answer = reasoning + thought, answer + said
                yield answer, reasoning, shown, conversation
        except VlmgraftError as err:
            raise self.gr.Error(str(err)) from err
        updated = {"messages": [*conversation["messages"], user, {"role": "assistant", "content": answer}],
                   "images": [*conversation["images"], *new], "image": image_path or conversation["image"]}
        yield answer, reasoning, [*shown, {"role": "assistant", "content": answer}], updated

    @staticmethod
    def clear():
        """Question, Answer, Reasoning, History and the conversation start over (the picture stays, to ask anew)."""
        return "", "", "", [], fresh_conversation()

    def detect(self, image_path, classes_text):
        """(the picture with boxes drawn, the parsed JSON)."""
        from vlmgraft.infer.detect import draw_boxes

        classes = split_classes(classes_text)
        if not image_path:
            raise self.gr.Error("Upload an image first.")
        if not classes:
            raise self.gr.Error("Name the classes to find, separated by commas (e.g. dog, cat or 苹果,狗).")
        try:
            image = self.backend.load_image(image_path)
            found = self.backend.detect(image, classes)
        except VlmgraftError as err:
            raise self.gr.Error(str(err)) from err
        if not found.parsed:
            self.gr.Warning("The model's answer held no box list; the raw answer is in the JSON.")
        return draw_boxes(image, found.boxes), {"classes": classes, "width": found.width, "height": found.height,
                                                "parsed": found.parsed, "boxes": found.boxes, "raw": found.answers}


def build_ui(backend: Backend):
    """The gradio Blocks app (not launched)."""
    gr = import_gradio()
    page = Page(backend, gr)
    name = Path(backend.options.model).name or backend.options.model
    switch_note = ("default: what the model was trained with" if backend.has_thinking_switch
                   else "this model's chat template has no thinking switch")
    with gr.Blocks(title=f"vlmgraft · {name}") as app:
        gr.Markdown(f"### vlmgraft · `{name}` on {backend.engine.device}")
        with gr.Tab("Chat"):
            conversation = gr.State(fresh_conversation())
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], height=260)
                    think = gr.Checkbox(label="Thinking", value=page.thinking_value(),
                                        interactive=backend.has_thinking_switch, info=switch_note)
                with gr.Column(scale=2):
                    history = gr.Chatbot(label="History", height=220)
                    question = gr.Textbox(label="Question", placeholder="Ask about the image", lines=1)
                    with gr.Row():
                        ask_button = gr.Button("Ask", variant="primary")
                        clear_button = gr.Button("Clear")
                    answer = gr.Textbox(label="Answer", lines=3, interactive=False)
                    with gr.Accordion("Reasoning", open=False):
                        reasoning = gr.Textbox(show_label=False, lines=3, interactive=False)
            outputs = [answer, reasoning, history, conversation]
            inputs = [image, question, think, history, conversation]
            ask_button.click(page.ask, inputs, outputs)
            question.submit(page.ask, inputs, outputs)
            clear_button.click(page.clear, None, [question, answer, reasoning, history, conversation])
        with gr.Tab("Detect"):
            with gr.Row():
                with gr.Column():
                    detect_image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], height=260)
                    classes = gr.Textbox(label="Classes", placeholder="comma-separated, e.g. dog, cat or 苹果,狗")
                    detect_button = gr.Button("Detect", variant="primary")
                boxes = gr.Image(label="Boxes", type="pil", interactive=False, height=260)
                parsed = gr.JSON(label="JSON")
            detect_button.click(page.detect, [detect_image, classes], [boxes, parsed])
    # Several pages' questions may wait in the worker at once, where the engine batches them.
    app.queue(default_concurrency_limit=backend.options.max_batch_size)
    return app


def launch(backend: Backend, app, prevent_thread_lock: bool = False):
    """Serve the app; the upload limit is enforced by gradio before our own checks see the file."""
    return app.launch(server_name=backend.options.host, server_port=backend.options.port, share=False,
                      max_file_size=backend.options.max_image_bytes, show_error=True, quiet=True,
                      prevent_thread_lock=prevent_thread_lock, footer_links=[])


def run(options: WebuiOptions) -> None:
    import logging

    import_gradio()
    backend = Backend(options)
    app = build_ui(backend)
    if options.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger(__name__).warning("serving the page on %s: anyone who can reach this port can use the model",
                                            options.host)
    backend.start()
    print(f"vlmgraft webui: http://{options.host}:{options.port} ({backend.engine.device})", flush=True)
    try:
        launch(backend, app)
    finally:
        backend.stop()
