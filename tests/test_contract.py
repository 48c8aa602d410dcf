"""The contract the callbacks rely on: every documented way to expose the Hugging Face model finds it."""

import lightning as L
import pytest
import torch

from rg_lightning.contract import hf_model


class _Model(torch.nn.Linear):
    """Stands in for a PreTrainedModel: a module with a config; calling it without inputs fails, as HF's do."""

    config = object()

    def __init__(self):
        super().__init__(2, 2)

    def forward(self, *args, **kwargs):
        raise AssertionError("the contract must not run the model")


class _AsModel(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model


class _AsMethod(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.net = model

    def hf_model(self):
        return self.net


class _AsAttribute(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.hf_model = model


class _AsProperty(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.net = model

    @property
    def hf_model(self):
        return self.net


@pytest.mark.parametrize("holder", [_AsModel, _AsMethod, _AsAttribute, _AsProperty])
def test_every_documented_way_finds_the_model(holder):
    model = _Model()
    assert hf_model(holder(model)) is model


def test_a_module_without_a_model_names_the_fix():
    with pytest.raises(TypeError, match="set `self.model`.*or define `hf_model\\(\\)`"):
        hf_model(L.LightningModule())
