"""Run under `torchrun --max-restarts=1` with a static rendezvous: the first worker group all-reduces, then rank 1
dies; in the restarted group rank 0 joins late, so the new rank 1 looks up rank 0's address before the new rank 0
has published it. Without a store scoped to the restart it would read the dead rank 0's address and fail to
connect. Each rank of the restarted group appends its all-reduce result to OUT.

    torchrun --nproc_per_node=2 --max-restarts=1 tests/dist_scripts/restart_rendezvous.py OUT
"""

from __future__ import annotations

import os
import sys
import time

import torch

from contrastive.dist import init_distributed, shutdown_distributed


def main(out: str) -> None:
    rank, restarts = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if restarts and rank == 0:
        time.sleep(3)
    env = init_distributed("cpu", "gloo", timeout_minutes=1)
    total = env.collectives.all_reduce_sum(torch.ones(1))
    if restarts == 0:
        if rank == 1:
            os._exit(1)
        time.sleep(60)  # until torchrun stops this group
    with open(out, "a") as handle:
        handle.write(f"{rank} {float(total)}\n")
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
