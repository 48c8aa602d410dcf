"""Sharding the callbacks cannot follow is refused up front, with an error that names the fix; FSDP2's row
sharding (ModelParallelStrategy) is followed by the guard (tested end to end in test_callbacks)."""

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from rg_lightning.callbacks import DriftGeometry, RefusalDirections, RepresentationProjection, SafetyEvaluation

CALLBACKS = [lambda: RefusalDirections(harmful=["a b", "c d"], harmless=["e f", "g h"]),
             RepresentationProjection, DriftGeometry]


@pytest.mark.parametrize("make", CALLBACKS, ids=["RefusalDirections", "RepresentationProjection", "DriftGeometry"])
def test_fsdp_over_two_processes_is_refused_naming_ddp(make):
    trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=2)
    with pytest.raises(ValueError, match=r"FSDPStrategy with 2 process.*strategy='ddp'"):
        make().setup(trainer, None, "fit")


@pytest.mark.parametrize("make", CALLBACKS, ids=["RefusalDirections", "RepresentationProjection", "DriftGeometry"])
@pytest.mark.parametrize("strategy, world_size", [
    (FSDPStrategy, 1), (DDPStrategy, 2),
    (lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), 2)])
def test_whole_row_strategies_pass(make, strategy, world_size):
    make().setup(SimpleNamespace(strategy=strategy(), world_size=world_size), None, "fit")


@pytest.mark.parametrize("make", CALLBACKS, ids=["RefusalDirections", "RepresentationProjection", "DriftGeometry"])
def test_tensor_parallelism_is_refused(make):
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        make().setup(SimpleNamespace(strategy=ModelParallelStrategy(), world_size=2), None, "fit")


def test_evaluation_refuses_row_sharding_over_processes():
    evaluation = SafetyEvaluation(benchmarks=["toy:harmful"], tasks=[])
    with pytest.raises(ValueError, match=r"ModelParallelStrategy with 2 process.*strategy='ddp'"):
        evaluation.setup(SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                                         world_size=2), None, "test")
    evaluation.setup(SimpleNamespace(strategy=DDPStrategy(), world_size=2, callbacks=[]), None, "fit")
