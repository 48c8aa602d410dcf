"""Helper of test_sharded_strategies: directions mode on a Gemma-2 model sharded with FSDP2 (one gloo process)
gives the directions of the same model unsharded (its norm gains are read from gathered weights)."""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoModelForCausalLM

from rg_lightning import CausalLMModule
from rg_lightning.guard.directions import direction_bases
from rg_lightning.fsdp2 import shard_model
from rg_lightning.guard.collect import collect_basis
from test_callbacks import HARMFUL, HARMLESS


def main(model_dir: str, tokenizer_dir: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    try:
        tokenizer = CausalLMModule(model=model_dir, tokenizer=tokenizer_dir).tokenizer
        plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        with torch.no_grad():  # gains that are not all equal, so scaling by them shows
            for name, p in plain.named_parameters():
                if "norm" in name:
                    p.copy_(torch.linspace(-0.5, 1.0, p.numel()).reshape(p.shape))
        basis = collect_basis(plain, tokenizer, HARMFUL, HARMLESS, energy=1.0, answer_tokens=0, batch_size=8)
        expected = direction_bases(plain, basis)
        sharded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        sharded.load_state_dict(plain.state_dict())
        shard_model(sharded, init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))["data_parallel"])
        assert type(sharded.model.layers[0].input_layernorm.weight).__name__ == "DTensor"
        got = direction_bases(sharded, basis)
        for want, have in zip(expected, got):
            assert want.keys() == have.keys() and want
            for name in want:
                torch.testing.assert_close(have[name], want[name], msg=name)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
