"""Streaming statistics equal the dense computation, hooks clean up, and the distributed sum is exact."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rg_lightning.guard import GramAccumulator, MeanAccumulator, capture_linear_inputs


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 5, 6, generator=g), torch.rand(3, 5, generator=g) > 0.4) for _ in range(4)]


def test_gram_equals_dense_gram_of_masked_rows():
    acc = GramAccumulator()
    for x, mask in _batches():
        acc.update("m", x, mask)
    rows = torch.cat([x[mask] for x, mask in _batches()]).double()
    gram = acc.state()["m"]
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, rows.T @ rows)
    assert acc.counts["m"] == rows.shape[0]


def test_gram_without_mask_uses_every_row_and_rejects_bad_mask():
    acc = GramAccumulator()
    x = torch.randn(2, 3, 4)
    acc.update("m", x)
    torch.testing.assert_close(acc.state()["m"], x.reshape(-1, 4).double().T @ x.reshape(-1, 4).double())
    with pytest.raises(ValueError, match="mask shape"):
        acc.update("m", x, torch.ones(3, 2, dtype=torch.bool))
    flat, mask = GramAccumulator(), torch.tensor([[True, False, True], [False, True, True]])
    flat.update("m", x.reshape(6, 4), mask)  # a module that reads the tokens flattened (an MoE's shared expert)
    rows = x[mask].double()
    torch.testing.assert_close(flat.state()["m"], rows.T @ rows)


def test_a_weighted_mask_weighs_each_rows_outer_product():
    """A float mask is a weight per row: Σ w x xᵀ over the rows with w > 0, counted as rows; weights of 1 are the
    boolean mask; a negative weight is refused."""
    weighted, unit, boolean = GramAccumulator(), GramAccumulator(), GramAccumulator()
    g = torch.Generator().manual_seed(1)
    expected, rows = torch.zeros(6, 6, dtype=torch.float64), 0
    for x, mask in _batches():
        weights = mask * torch.rand(mask.shape, generator=g)
        weighted.update("m", x, weights)
        unit.update("m", x, mask.double())
        boolean.update("m", x, mask)
        flat, w = x.reshape(-1, 6).double(), weights.reshape(-1).double()
        expected += (flat * w[:, None]).T @ flat
        rows += int((w > 0).sum())
    torch.testing.assert_close(weighted.state()["m"], expected)
    assert weighted.counts["m"] == rows
    torch.testing.assert_close(unit.state()["m"], boolean.state()["m"])
    assert unit.counts["m"] == boolean.counts["m"]
    with pytest.raises(ValueError, match="weights must be >= 0"):
        weighted.update("m", x, -mask.double())
    flat, rows_weights = GramAccumulator(), torch.tensor([[0.5, 0.0, 1.0], [0.0, 2.0, 0.25]])
    x = torch.randn(2, 3, 4)
    flat.update("m", x.reshape(6, 4), rows_weights)  # read flattened (an MoE's shared expert): row for row
    rows, w = x.reshape(6, 4).double(), rows_weights.reshape(-1).double()
    torch.testing.assert_close(flat.state()["m"], (rows * w[:, None]).T @ rows)


def test_mean_accumulator_per_key():
    acc = MeanAccumulator()
    rows = {}
    for i, (x, mask) in enumerate(_batches()):
        key = (i % 2, -1)
        acc.update(key, x, mask)
        rows.setdefault(key, []).append(x[mask])
    for key, parts in rows.items():
        torch.testing.assert_close(acc.mean(key), torch.cat(parts).double().mean(0))
    assert acc.state()[(0, -1)].dtype == torch.float64
    with pytest.raises(ValueError, match="no rows"):
        acc.mean((5, 0))


def test_capture_linear_inputs_per_batch_mask_and_hook_removal():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    acc = GramAccumulator()
    xs = [torch.randn(2, 3, 4) for _ in range(2)]
    masks = [torch.tensor([[True, False, True], [False, False, True]]), torch.ones(2, 3, dtype=torch.bool)]
    with capture_linear_inputs(model, ["0", "2"], acc) as cap:
        for x, mask in zip(xs, masks):
            cap.mask = mask
            model(x)
    rows0 = torch.cat([x[m] for x, m in zip(xs, masks)]).double()
    rows2 = torch.cat([model[1](model[0](x))[m] for x, m in zip(xs, masks)]).double()
    torch.testing.assert_close(acc.state()["0"], rows0.T @ rows0)
    torch.testing.assert_close(acc.state()["2"], rows2.T @ rows2)
    model(xs[0])  # hooks are gone: nothing more is accumulated
    assert acc.counts["0"] == rows0.shape[0]

    with pytest.raises(RuntimeError, match="boom"):
        with capture_linear_inputs(model, ["0"], GramAccumulator()):
            raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_capture_rejects_unknown_names_with_close_matches():
    model = nn.ModuleDict({"q_proj": nn.Linear(4, 6)})
    with pytest.raises(ValueError, match=r"'q_prj'.*close: \['q_proj'\]"):
        with capture_linear_inputs(model, ["q_prj"], GramAccumulator()):
            pass


def _worker(rank, path, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    acc, mean = GramAccumulator(), MeanAccumulator()
    x = torch.full((rank + 1, 2), float(rank + 1))
    for name in ("b", "a"):  # insertion order differs from sorted order on purpose
        acc.update(name, x)
    mean.update((0, -1), x)
    acc.all_reduce_()
    mean.all_reduce_()
    out[rank] = (acc.state()["a"].tolist(), acc.counts["a"], mean.mean((0, -1)).tolist())
    dist.destroy_process_group()


def test_all_reduce_sums_over_processes(tmp_path):
    out = mp.Manager().dict()
    mp.start_processes(_worker, args=(str(tmp_path / "store"), out), nprocs=2, start_method="fork")
    # rank0: one row (1,1); rank1: two rows (2,2) -> Σxxᵀ = 1 + 8 per entry, 3 rows, mean 5/3
    for rank in (0, 1):
        gram, count, mean = out[rank]
        assert gram == [[9.0, 9.0], [9.0, 9.0]] and count == 3
        assert mean == pytest.approx([5 / 3, 5 / 3])


def _mismatch_worker(rank, path, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    acc = GramAccumulator()
    acc.update("a" if rank == 0 else "b", torch.ones(1, 2))  # same shapes: a blind sum would add two modules
    try:
        acc.all_reduce_()
        out[rank] = "reduced"
    except ValueError as error:
        out[rank] = str(error)
    dist.destroy_process_group()


def test_processes_holding_different_keys_are_refused_not_summed(tmp_path):
    out = mp.Manager().dict()
    mp.start_processes(_mismatch_worker, args=(str(tmp_path / "store"), out), nprocs=2, start_method="fork")
    assert all("processes hold different keys" in out[rank] for rank in (0, 1))


def test_all_reduce_is_a_no_op_without_distributed():
    acc = GramAccumulator()
    acc.update("m", torch.ones(1, 2))
    acc.all_reduce_()
    assert acc.counts["m"] == 1
