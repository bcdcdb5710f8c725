"""tunelab.training.distributed: each process's share of a batch; the DDP wrapper dropped before the group is left.

Several real processes (torchrun) are in tests/integration/test_distributed.py; these run in one process, in a
one-member gloo group where a group is needed.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tunelab.training import distributed
from tunelab.training.distributed import World


def test_each_process_takes_a_contiguous_share_and_together_they_take_every_row():
    rows = list(range(7))
    shares = [distributed.local_rows(rows, World(rank, 3)) for rank in range(3)]
    assert sum(shares, []) == rows
    assert [len(share) for share in shares] == [3, 3, 1]  # ceil(7 / 3) each, the last what is left
    assert distributed.local_rows(rows, World()) == rows


def test_unwrap_gives_the_module_inside_ddp_so_the_reducer_goes_before_the_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        inner = nn.Linear(2, 2)
        wrapped = DistributedDataParallel(inner)
        assert distributed.unwrap(wrapped) is inner
        assert distributed.unwrap(inner) is inner  # FSDP-sharded and plain modules are their own
    finally:
        del wrapped
        distributed.shutdown(World(0, 2))  # world.active: leaves the group
    assert not dist.is_initialized()
