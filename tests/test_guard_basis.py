"""SafetyBasis files: a bit-exact round trip, and damaged or foreign files refused with an error that says so."""

import json

import pytest
import torch
from torch import nn

from rg_lightning.guard.basis import SafetyBasis


def _basis(**changes):
    fields = dict(harmful_means=torch.randn(2, 3, 8, dtype=torch.float64),
                  harmless_means=torch.randn(2, 3, 8, dtype=torch.float64),
                  subspaces={"up": torch.eye(8)[:, :2]}, protected_token_ids=torch.tensor([1, 4, 5]),
                  metadata={"selected": {"layer": 1, "position": -1}, "model_id": "tiny"})
    fields.update(changes)
    return SafetyBasis(**fields)


def test_save_and_load_round_trip_bit_exact(tmp_path):
    basis = _basis()
    loaded = SafetyBasis.load(basis.save(str(tmp_path / "basis")))
    for key, value in basis.tensors().items():
        assert torch.equal(loaded.tensors()[key], value) and loaded.tensors()[key].dtype == value.dtype, key
    assert loaded.metadata == basis.metadata


@pytest.mark.parametrize("changes, message", [
    ({"protected_token_ids": torch.tensor([True, False, True])}, "protected_token_ids must be 1-D integers"),
    ({"protected_token_ids": torch.tensor([1.5])}, "protected_token_ids must be 1-D integers"),
    ({"metadata": ["model_id"]}, "metadata must be a JSON object"),
    ({"metadata": {"selected": {"layer": "1", "position": -1}}}, "`selected` must be"),
    ({"metadata": {"selected": {"layer": 1}}}, "`selected` must be"),
])
def test_malformed_contents_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        _basis(**changes)


def test_damaged_or_foreign_files_are_refused(tmp_path):
    directory = tmp_path / "basis"
    _basis().save(str(directory))
    (directory / "basis.json").unlink()
    with pytest.raises(FileNotFoundError, match="No basis.json"):
        SafetyBasis.load(str(directory))
    (directory / "basis.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SafetyBasis.load(str(directory))
    (directory / "basis.json").write_text(json.dumps({}))
    torch.save(_basis().tensors(), directory / "basis.safetensors")  # a pickle under the expected name
    with pytest.raises(ValueError, match="not a safetensors file"):
        SafetyBasis.load(str(directory))


def test_a_subspace_of_another_width_is_refused_before_any_constraint_is_built():
    model = nn.ModuleDict({"up": nn.Linear(16, 4)})
    with pytest.raises(ValueError, match="8-wide subspace for up, which reads 16 features"):
        _basis().check_compatible(model)
    _basis(subspaces={"up": torch.eye(16)[:, :2]}).check_compatible(model)
