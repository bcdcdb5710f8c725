"""A KV cache with room reserved for the tokens still to come, so decoding writes in place.

transformers' DynamicCache grows by `torch.cat` on every decode step: each step copies the
whole cache of every layer to append one token: 0.54 s of a 3.35 s run of 128 Banking77
demo prompts (2-core AMX VM; docs/benchmarks.md).
Here each layer's keys and values live in a buffer with `reserve` spare slots; a step
writes its token into the next slot and hands attention a view of the filled part (the
CPU flash-attention kernel reads such a strided view as fast as a contiguous tensor).

transformers' StaticCache does the writing in place too, but attends over its whole fixed
length and wants the mask and cache positions laid out for it; this keeps DynamicCache's
contract (the cache holds exactly the tokens seen), so nothing else in decoding changes.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer


class ReservedLayer(DynamicLayer):
    """One layer's keys and values, (B, Hkv, filled, D) views of buffers with spare slots."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, filled: int) -> None:
        super().__init__()
        self.dtype, self.device = key_buffer.dtype, key_buffer.device
        self.is_initialized = True
        self._key_buffer, self._value_buffer, self._filled = key_buffer, value_buffer, filled
        self._refresh()

    def _refresh(self) -> None:
        self.keys = self._key_buffer[:, :, : self._filled]
        self.values = self._value_buffer[:, :, : self._filled]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        if self._filled + new > self._key_buffer.shape[-2]:  # out of room: grow like DynamicLayer, keep a reserve
            self._key_buffer = torch.cat([self.keys, key_states, torch.empty_like(key_states)], dim=-2)
            self._value_buffer = torch.cat([self.values, value_states, torch.empty_like(value_states)], dim=-2)
        else:
            self._key_buffer[:, :, self._filled : self._filled + new] = key_states
            self._value_buffer[:, :, self._filled : self._filled + new] = value_states
        self._filled += new
        self._refresh()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._filled

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._key_buffer = self._key_buffer[indices]
        self._value_buffer = self._value_buffer[indices]
        self._refresh()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self._filled -= abs(tokens_to_remove)
        self._refresh()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._key_buffer = self._key_buffer.repeat_interleave(repeats, dim=0)
        self._value_buffer = self._value_buffer.repeat_interleave(repeats, dim=0)
        self._refresh()

    def reset(self) -> None:
        self._filled = 0
        self._refresh()


def reserved_cache(config: PretrainedConfig, buffers: list[tuple[torch.Tensor, torch.Tensor]], filled: int) -> DynamicCache:
    """A DynamicCache over per-layer (keys, values) buffers whose first `filled` slots hold the prompt.

    Models whose cache layers are not plain DynamicLayers (sliding windows) keep their own
    layers, which are handed the prompt and grow as transformers grows them.
    """
    cache = DynamicCache(config=config)
    if len(cache.layers) == len(buffers) and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [ReservedLayer(keys, values, filled) for keys, values in buffers]
    else:
        for index, (keys, values) in enumerate(buffers):
            cache.update(keys[:, :, :filled], values[:, :, :filled], index)
    return cache
