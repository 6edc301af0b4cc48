"""`vlmgraft chat`: one question (`--prompt`) or a multi-turn conversation in the terminal, streamed as generated.

Reasoning (a `<think>` block) streams to stderr and the answer to stdout, so `vlmgraft chat M --prompt … > out.txt`
keeps only the answer; `--json` prints one object for scripts instead.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

from vlmgraft.errors import VlmgraftError
from vlmgraft.images import ImageError, ImagePolicy, load_image
from vlmgraft.infer.prompts import ReasoningSplitter

HELP = "commands: /image PATH_OR_URL adds an image to your next message, /reset starts over, /exit quits"


@dataclass
class ChatOptions:
    model: str
    images: list[str] = field(default_factory=list)
    prompt: str | None = None
    system: str | None = None
    think: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int = 1024
    seed: int | None = None
    json: bool = False
    device: str = "auto"
    dtype: str = "auto"
    allow_remote_images: bool = False


class ChatSession:
    """A conversation with its images; `ask` streams one answer and records the turn."""

    def __init__(self, model, processor, options: ChatOptions, out=None, err=None):
        from vlmgraft.infer.prompts import default_thinking, supports_thinking
        from vlmgraft.infer.sampling import model_sampling_defaults

        self.model, self.processor, self.options = model, processor, options
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.policy = ImagePolicy(allow_remote=options.allow_remote_images, allow_local=True)
        defaults = model_sampling_defaults(model)
        self.sampling = {name: getattr(options, name) if getattr(options, name) is not None else defaults[name]
                         for name in ("temperature", "top_p", "top_k")}
        if options.think is not None and not supports_thinking(processor):
            print("note: this model's chat template has no thinking switch; --think/--no-think is ignored",
                  file=self.err)
        # Unset: the thinking switch the model was trained with (an `enable_thinking: false` run answers without).
        self.think = default_thinking(processor, options.model, options.think)
        self.reset()

    def reset(self) -> None:
        self.history: list[dict] = [{"role": "system", "content": self.options.system}] if self.options.system else []
        self.images: list = []
        self.pending: list = []

    def add_image(self, reference: str) -> None:
        try:
            self.pending.append(load_image(reference, self.policy))
        except ImageError as err:
            raise VlmgraftError(f"image {reference!r}: {err}") from err

    def ask(self, text: str, stream: bool = True):
        from vlmgraft.infer.generate import generate

        user = {"role": "user", "content": [{"type": "image"} for _ in self.pending] + [{"type": "text", "text": text}]}
        splitter = ReasoningSplitter()
        said_anything = [False, False]

        def show(_, delta: str) -> None:
            thought, answer = splitter.feed(delta)
            if thought:
                self.err.write(("thinking: " if not said_anything[0] else "") + thought)
                self.err.flush()
                said_anything[0] = True
            if answer:
                self.out.write(answer)
                self.out.flush()
                said_anything[1] = True

        start = time.perf_counter()
        result = generate(self.model, self.processor, [self.history + [user]], [self.images + self.pending],
                          max_new_tokens=self.options.max_new_tokens, seed=self.options.seed,
                          enable_thinking=self.think, stream=show if stream else None, **self.sampling)[0]
        seconds = time.perf_counter() - start
        if stream:
            thought, answer = splitter.feed("", final=True)
            self.err.write(thought + ("\n" if said_anything[0] else ""))
            self.out.write(answer + "\n")
            self.out.flush()
        self.history += [user, {"role": "assistant", "content": result.text}]
        self.images += self.pending
        self.pending = []
        return result, seconds


def run_chat(options: ChatOptions, input_fn=input, out=None, err=None) -> int:
    from vlmgraft.infer.model import load_for_inference

    out, err = out or sys.stdout, err or sys.stderr
    model, processor = load_for_inference(options.model, options.device, options.dtype)
    session = ChatSession(model, processor, options, out, err)
    for reference in options.images:
        session.add_image(reference)
    if options.prompt is not None:
        result, seconds = session.ask(options.prompt, stream=not options.json)
        if options.json:
            print(json.dumps({"answer": result.text, "reasoning": result.reasoning,
                              "tokens": result.completion_tokens, "prompt_tokens": result.prompt_tokens,
                              "finish_reason": result.finish_reason, "seconds": round(seconds, 3)},
                             ensure_ascii=False), file=out)
        return 0
    print(f"vlmgraft chat with {options.model} on {next(model.parameters()).device} — {HELP}", file=err)
    while True:
        try:
            line = input_fn("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=err)
            return 0
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                session.reset()
                print("(conversation cleared)", file=err)
            elif command == "/image" and argument.strip():
                try:
                    session.add_image(argument.strip())
                    print(f"(image added: {len(session.pending)} waiting for your next message)", file=err)
                except VlmgraftError as problem:
                    print(f"error: {problem}", file=err)
            else:
                print(HELP, file=err)
            continue
        session.ask(line)
