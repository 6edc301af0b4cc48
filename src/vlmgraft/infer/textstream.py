"""Token ids → text deltas as they arrive: incremental detokenization plus stop strings.

Decoding each new token alone breaks multi-byte characters (a CJK character is often two byte-level tokens) and
word boundaries, so text is decoded over a short window and only the settled part is emitted. Text that might be
the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations


class IncrementalDecoder:
    """Emits the text of appended token ids without splitting characters (prefix/read offsets, as in TGI and vLLM)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]


class TextStream:
    """Text deltas of one generation; `stopped` turns True when a stop string appears (it is not emitted)."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = [s for s in (stop or []) if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # everything decoded so far (up to a stop string, once found)
        self.emitted = 0
        self.stopped = False

    def push(self, new_ids: list[int]) -> str:
        if self.stopped:
            return ""
        return self._advance(self.decoder.push(new_ids), final=False)

    def finish(self) -> str:
        """The held-back rest once generation has ended."""
        if self.stopped:
            return ""
        return self._advance(self.decoder.flush(), final=True)

    def _advance(self, delta: str, final: bool) -> str:
        self.text += delta
        if self.stop:
            search_from = max(0, self.emitted - self._hold)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                final = True
        safe = len(self.text) if final else max(self.emitted, len(self.text) - self._hold)
        out = self.text[self.emitted:safe]
        self.emitted = safe
        return out
