"""Per-step attention metadata: an explicit argument of every attention call, never a global.

The batch is flattened: the new tokens of request r are rows
``query_start_loc[r] : query_start_loc[r + 1]`` of the token axis. ``seq_lens[r]`` counts the
request's whole context after this step (cached prefix + new tokens), so its new tokens sit at
positions ``seq_lens[r] - q_len_r ... seq_lens[r] - 1``.

Paged KV cache (one pair per layer)::

    key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size]
    token at position p of request r lives in
        block  block_tables[r, p // block_size],  row  p % block_size
    slot_mapping[t] = block * block_size + row   for each new token t (flattened slot index)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [R + 1] int32
    seq_lens: torch.Tensor  # [R] int32
    block_tables: torch.Tensor  # [R, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64
    max_query_len: int
    max_seq_len: int
    # Host copies, so CPU paths and launch-size decisions never sync with the device.
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    sliding_window: int | None = None
    # Host-side plans derived from the fields above by a CPU path, built on the first layer's
    # call and reused by the others (the metadata is one step's, shared by every layer).
    plans: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Builds the metadata of a batch from plain lists (one entry per request)."""
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        slots: list[int] = []
        for q_len, s_len, table in zip(query_lens, seq_lens, block_tables):
            for pos in range(s_len - q_len, s_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=0) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_start_loc_host=starts,
            seq_lens_host=list(seq_lens),
        )
