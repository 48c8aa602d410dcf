"""Helper of test_eval_metrics: AttackSuccessRate over 2 CPU processes (gloo) with uneven shards.

Each rank writes ``rank<N>.json`` next to the init file: the synced hits, total and rate it sees after
``compute`` (files, not stdout, because the two processes' prints can interleave on one line).
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from rg_lightning.evaluation.metrics import AttackSuccessRate

# Rank 0 sees 7 answers in two updates, rank 1 sees 4 in one update plus an empty one.
SHARDS = {0: [[True, False, True], [True, False, False, False]], 1: [[False, True, True, True], []]}


def run(rank: int, world_size: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metric = AttackSuccessRate()
        for values in SHARDS[rank]:
            metric.update(values)
        rate = metric.compute()
        with metric.sync_context():
            hits, total = int(metric.hits), int(metric.total)
        record = {"rank": rank, "hits": hits, "total": total, "rate": rate.item()}
        (Path(init_file).parent / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # fork: the children inherit the imports instead of paying for them again
    mp.start_processes(run, args=(2, sys.argv[1]), nprocs=2, start_method="fork")
