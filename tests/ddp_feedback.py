"""Helper of test_feedback_callback: a guarded fine-tune of the miniature aligned model with RefusalFeedback over
CPU processes (``ddp``, the default, or ``fsdp2``); each rank saves the feedback's history and scale and its whole
weights to rank<N>.pt."""

import sys
from pathlib import Path

import torch

from test_feedback_callback import ALWAYS_TIGHTER, fit, guarded
from rg_lightning.callbacks import RefusalFeedback

if __name__ == "__main__":
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    strategy = sys.argv[3] if len(sys.argv) > 3 else "ddp"
    feedback = RefusalFeedback(every_n_steps=1, n_probes=8, **ALWAYS_TIGHTER)
    weights, trainer = fit(out, guarded(feedback), devices=devices, strategy=strategy)
    torch.save({"history": feedback.history, "scale": feedback.scale, "weights": weights},
               out / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():  # a process group left to interpreter exit can abort the process
        torch.distributed.destroy_process_group()
