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


@pytest.mark.parametrize("weights", [None, torch.tensor([1.0, 0.25, 0.5])], ids=["exact-rows", "damped-rows"])
def test_save_and_load_round_trip_bit_exact(tmp_path, weights):
    basis = _basis(protected_token_weights=weights)
    loaded = SafetyBasis.load(basis.save(str(tmp_path / "basis")))
    assert set(loaded.tensors()) == set(basis.tensors())
    assert ("protected_token_weights" in loaded.tensors()) == (weights is not None)  # a basis without: every row exact
    for key, value in basis.tensors().items():
        assert torch.equal(loaded.tensors()[key], value) and loaded.tensors()[key].dtype == value.dtype, key
    assert loaded.metadata == basis.metadata


@pytest.mark.parametrize("changes, message", [
    ({"protected_token_ids": torch.tensor([True, False, True])}, "protected_token_ids must be 1-D integers"),
    ({"protected_token_ids": torch.tensor([1.5])}, "protected_token_ids must be 1-D integers"),
    ({"metadata": ["model_id"]}, "metadata must be a JSON object"),
    ({"metadata": {"selected": {"layer": "1", "position": -1}}}, "`selected` must be"),
    ({"metadata": {"selected": {"layer": 1}}}, "`selected` must be"),
    ({"subspaces": {"up": torch.ones(8)}}, "subspace up must be a 2-D float"),
    ({"subspaces": {"up": torch.ones(8, 2, dtype=torch.int8)}}, "subspace up must be a 2-D float"),
    ({"harmful_means": torch.ones(2, 3, 8, dtype=torch.int64),
      "harmless_means": torch.ones(2, 3, 8, dtype=torch.int64)}, "means must be floating point"),
    ({"metadata": {"post_instruction_tokens": 7}}, "counts 7 post-instruction positions, its means hold 3"),
    ({"metadata": {"subspace_dims": {"up": 5}}}, "other subspace widths than its tensors"),
    ({"embedding_probe_ids": torch.tensor([1, 4])}, "embedding probe must be"),
    ({"embedding_probe_ids": torch.tensor([1, 4]), "embedding_probe_rows": torch.ones(3, 8)},
     "embedding probe must be"),
    ({"protected_token_weights": torch.tensor([1.0, 0.5])}, "one weight in \\[0, 1\\] per distinct"),
    ({"protected_token_weights": torch.tensor([1.0, 0.5, 1.5])}, "one weight in \\[0, 1\\] per distinct"),
    ({"protected_token_weights": torch.tensor([1, 1, 1])}, "one weight in \\[0, 1\\] per distinct"),
    ({"protected_token_weights": torch.tensor([1.0, float("nan"), 1.0])}, "one weight in \\[0, 1\\] per distinct"),
    ({"protected_token_ids": torch.tensor([1, 1, 5]), "protected_token_weights": torch.ones(3)},
     "one weight in \\[0, 1\\] per distinct"),
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


def test_a_basis_of_another_model_with_the_same_shapes_is_refused_by_its_embedding_rows(tmp_path):
    """Two runs of one architecture pass every shape and name check; the measured embedding rows tell them apart
    (the same weights in bfloat16 pass)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rg_lightning.guard.basis import embedding_probe

    def model(seed):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1))

    measured = model(0)
    basis = SafetyBasis.load(_basis(protected_token_ids=torch.tensor([3, 9, 11]), subspaces={},
                                    metadata={"model_id": "runs/a/model"},
                                    **dict(zip(("embedding_probe_ids", "embedding_probe_rows"),
                                               embedding_probe(measured, torch.tensor([3, 9, 11]))))
                                    ).save(str(tmp_path / "basis")))
    basis.check_compatible(measured, "runs/a/model")
    basis.check_compatible(model(0).to(torch.bfloat16), "runs/b/model")
    with pytest.raises(ValueError, match="measured on other weights: the input embeddings of 3 of its protected"):
        basis.check_compatible(model(1), "runs/b/model")
    too_few_rows = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1))
    with pytest.raises(ValueError, match="protects token id 11, beyond this model's 10 embedding rows"):
        basis.check_compatible(too_few_rows)
    _basis().check_compatible(model(1))  # a basis saved before the probe existed: not checked
