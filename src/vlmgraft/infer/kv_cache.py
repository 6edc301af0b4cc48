"""A key/value cache with one fixed row ("slot") per running sequence, each writing at its own position.

transformers' `StaticCache` writes every row of a batch at the same `cache_position`, so a sequence cannot join a
batch that is already decoding. Continuous batching needs per-row write positions; this cache provides them while
keeping the fixed shapes and addresses that CUDA graphs need. It duck-types the two calls a decoder layer makes
(`update` and `get_seq_length`), so the stock transformers text model runs on it unchanged.

Layout: a prompt prefilled in a batch padded on the left to length Lb occupies storage [0, Lb) of its slot (the
padding part is masked out by the caller), and decode step t writes storage Lb + t. One extra slot at the end is a
scratch row for the dummy rows that pad a prefill batch up to its captured size.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, num_layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (slots + 1, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.scratch_slot = slots
        self.max_len = max_len
        self._mode: tuple = ()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def for_prefill(self, slots: torch.Tensor, length: int) -> SlotKVCache:
        """Next forward writes a whole padded prompt block [0, length) into the rows named by `slots`."""
        self._mode = ("prefill", slots, length)
        return self

    def for_decode(self, write_index: torch.Tensor, batch: int, attend_len: int) -> SlotKVCache:
        """Next forward writes one token per row of slots [0, batch) at `write_index` and attends [0, attend_len)."""
        self._mode = ("decode", write_index, batch, attend_len)
        return self

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        mode = self._mode
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if mode[0] == "prefill":
            _, slots, length = mode
            keys[:, :, :length].index_copy_(0, slots, key_states)
            values[:, :, :length].index_copy_(0, slots, value_states)
            return key_states, value_states  # the prompt attends only to itself
        _, write_index, batch, attend_len = mode
        # Under torch.compile this in-place row write is lowered to a copy of keys[:batch] (a flat index_copy_ was
        # worse, copying the whole buffer; bench/bench_serve.py),
        # hence the engine compiles only small decode batches (EngineConfig.compile_max_batch).
        index = write_index.view(batch, 1, 1, 1).expand(batch, key_states.shape[1], 1, key_states.shape[-1])
        keys[:batch].scatter_(2, index, key_states)
        values[:batch].scatter_(2, index, value_states)
        return keys[:batch, :, :attend_len], values[:batch, :, :attend_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Only consulted when no position ids are given; the engine always gives them.
        return 0
