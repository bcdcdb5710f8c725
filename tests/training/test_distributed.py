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


AGREE_SCRIPT = """
import json, sys
from tunelab.training import distributed, setup

world = distributed.init_from_env()
if not world.is_main:
    def refuse(setting, *args, **kwargs):
        raise AssertionError("only rank 0 measures")
    setup.choose_precision = refuse
precision = setup.agreed_precision("auto", world)
text = distributed.broadcast_text("run-dir é" if world.is_main else None, world)
print(json.dumps({"rank": world.rank, "bf16": precision.bf16, "reason": precision.reason, "text": text}))
distributed.shutdown(world)
"""


def test_rank_0_alone_measures_the_precision_and_the_others_take_its_choice(tmp_path):
    """Two real processes in a gloo group on 127.0.0.1: the timing that decides `auto` runs on rank 0 only, so
    processes timed side by side cannot train in different precisions; strings travel without pickle."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "agree.py"
    script.write_text(AGREE_SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "TUNELAB_HOME": str(tmp_path / "home")}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    first, second = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    assert first["bf16"] == second["bf16"]
    assert second["reason"] == first["reason"] + " (rank 0's choice)"
    assert "training-sized matrix product" in first["reason"]
    assert first["text"] == second["text"] == "run-dir é"
