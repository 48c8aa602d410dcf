"""Sharding the callbacks cannot follow is refused up front, with an error that names the fix; FSDP2's row
sharding (ModelParallelStrategy) is followed by the guard (tested end to end in test_callbacks)."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from rg_lightning.callbacks import DriftGeometry, RefusalDirections, RepresentationProjection, SafetyEvaluation

HERE = Path(__file__).resolve().parent
CALLBACKS = [lambda: RefusalDirections(harmful=["a b", "c d"], harmless=["e f", "g h"]),
             RepresentationProjection, lambda: DriftGeometry(harmful=["a b", "c d"], harmless=["e f", "g h"])]


@pytest.mark.parametrize("make", CALLBACKS, ids=["RefusalDirections", "RepresentationProjection", "DriftGeometry"])
def test_fsdp_over_two_processes_is_refused_naming_ddp(make):
    trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=2, callbacks=[])
    with pytest.raises(ValueError, match=r"FSDPStrategy with 2 process.*strategy='ddp'"):
        make().setup(trainer, None, "fit")


@pytest.mark.parametrize("make", CALLBACKS, ids=["RefusalDirections", "RepresentationProjection", "DriftGeometry"])
@pytest.mark.parametrize("strategy, world_size", [
    (FSDPStrategy, 1), (DDPStrategy, 2),
    (lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), 2)])
def test_whole_row_strategies_pass(make, strategy, world_size):
    make().setup(SimpleNamespace(strategy=strategy(), world_size=world_size, callbacks=[]), None, "fit")


@pytest.mark.parametrize("make", CALLBACKS, ids=["RefusalDirections", "RepresentationProjection", "DriftGeometry"])
def test_tensor_parallelism_is_refused(make):
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        make().setup(SimpleNamespace(strategy=ModelParallelStrategy(), world_size=2, callbacks=[]), None, "fit")


def test_evaluation_follows_fsdp2_but_refuses_tensor_parallelism():
    evaluation = SafetyEvaluation(benchmarks=["toy:harmful"], tasks=[])
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        evaluation.setup(SimpleNamespace(strategy=ModelParallelStrategy(), world_size=2), None, "test")
    for strategy in (DDPStrategy(), ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)):
        evaluation.setup(SimpleNamespace(strategy=strategy, world_size=2, callbacks=[]), None, "fit")


def test_lora_under_fsdp2_resumes_like_ddp_and_exports(tmp_path, tiny_models):
    """CausalLMModule shards itself under ModelParallelStrategy (LoRA, 2 processes, the three callbacks): a fit
    checkpointed at step 2 and resumed to 4 restores the basis (never recomputes it), every rank agrees, it
    ends where the same crash-and-resume under DDP ends, and the merged export is written from the shards."""
    runs = {}
    for strategy in ("ddp", "fsdp2"):
        out = tmp_path / strategy
        result = subprocess.run([sys.executable, str(HERE / "fsdp2_module.py"), tiny_models["llama"], str(out),
                                 strategy],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        ranks = [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
        assert [(r["sharded"], r["step"]) for r in ranks] == [(strategy == "fsdp2", 4)] * 2
        for key, weight in ranks[0]["weights"].items():
            assert torch.equal(weight, ranks[1]["weights"][key]), f"{strategy}: ranks disagree on {key}"
        assert ranks[0]["drift"] == ranks[1]["drift"] and [r["step"] for r in ranks[0]["drift"]] == [0, 1, 2, 3, 4]
        for name, basis in ranks[0]["first"].items():  # measured on the aligned model at the first fit's start
            assert torch.equal(ranks[0]["subspaces"][name], basis), f"{strategy}: basis recomputed on resume: {name}"
        assert not (out / "export" / "adapter_config.json").exists(), strategy  # merged into the base
        runs[strategy] = ranks[0]["weights"], AutoModelForCausalLM.from_pretrained(out / "export").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).state_dict()
    assert any(not torch.equal(base[k], w) for k, w in runs["ddp"][1].items())  # the adapters learnt something
    for ddp, fsdp2 in zip(runs["ddp"], runs["fsdp2"]):  # the adapters (and frozen base), then the merged export
        for key, weight in ddp.items():
            torch.testing.assert_close(fsdp2[key], weight, atol=1e-5, rtol=0, msg=key)


class _Mesh:
    """Just enough of a DeviceMesh: named dimensions and their sizes."""

    def __init__(self, **sizes):
        self.mesh_dim_names, self.sizes = tuple(sizes), sizes

    def __getitem__(self, name):
        return SimpleNamespace(size=lambda: self.sizes[name])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_parameters_the_guard_cannot_hold_are_refused_on_every_rank(tmp_path, tiny_models, strategy):
    """Under FSDP2 the forward runs on gathered copies, so autograd.grad never reaches the sharded parameters:
    the check must still find DoRA's adapters read, on every rank, and leave no gradient or gathered weight."""
    out = tmp_path / strategy
    result = subprocess.run([sys.executable, str(HERE / "fsdp2_unconstrained.py"), tiny_models["llama"], str(out),
                             strategy], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert rank["sharded"] == (strategy == "fsdp2")
        assert "read have no constraint" in (rank["error"] or ""), rank
        assert rank["with_grad"] == [] and rank["gathered"] == []


def test_module_sharding_refuses_tensor_parallelism_and_quantized_weights():
    from rg_lightning.fsdp2 import check_data_parallel_mesh

    check_data_parallel_mesh(_Mesh(data_parallel=2, tensor_parallel=1), quantized=False)
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        check_data_parallel_mesh(_Mesh(data_parallel=1, tensor_parallel=2), quantized=False)
    with pytest.raises(ValueError, match="strategy='ddp' for QLoRA"):
        check_data_parallel_mesh(_Mesh(data_parallel=2, tensor_parallel=1), quantized=True)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("lora", [0, 2])
def test_decoder_layers_are_the_fsdp2_units(tiny_models, family, lora):
    from rg_lightning import CausalLMModule
    from rg_lightning.fsdp2 import decoder_layers

    module = CausalLMModule(model=tiny_models[family], lora_r=lora)
    module.configure_model()
    layers = decoder_layers(module.model)
    config = module.model.config
    assert len(layers) == config.num_hidden_layers and all(type(m).__name__.endswith("DecoderLayer") for m in layers)


def _free_port() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def test_directions_mode_reads_norm_gains_of_a_sharded_model(tiny_models):
    result = subprocess.run([sys.executable, str(HERE / "fsdp2_directions.py"), tiny_models["gemma2"],
                             tiny_models["llama"], _free_port()], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_replicated_dtensors_hold_all_rows_and_row_shards_do_not():
    """DriftGeometry sums row shards' gradient energy over ranks: a replicated tensor, whole on every rank, must be
    counted once, not once per rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from rg_lightning.guard.shards import holds_all_rows

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        t = torch.randn(4, 3)
        assert holds_all_rows(t) and holds_all_rows(distribute_tensor(t, mesh, [Replicate()]))
        assert not holds_all_rows(distribute_tensor(t, mesh, [Shard(0)]))
    finally:
        dist.destroy_process_group()
