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

    def generate(self, *args, **kwargs):
        raise AssertionError("the contract must not run the model")

    def get_input_embeddings(self):
        return self


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


def test_a_wrapper_of_the_users_own_is_refused_and_a_compiled_model_is_unwrapped():
    """A wrapper that copies ``config`` passed the check and crashed deep inside (no ``generate``, no
    ``position_ids``); torch.compile's wrapper is measured through the model it wraps (same parameters)."""
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

    with pytest.raises(TypeError, match="a wrapper module of your own is not one"):
        hf_model(_AsModel(Wrapper(_Model())))
    model = _Model()
    assert hf_model(_AsModel(torch.compile(model))) is model


def test_the_tokenizer_is_the_one_with_the_training_template():
    from types import SimpleNamespace

    from rg_lightning.contract import tokenizer_of

    def tokenizer(template):
        return SimpleNamespace(chat_template=template)

    module = SimpleNamespace(tokenizer=tokenizer(None))
    data = tokenizer("{{ messages }}")
    trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=data))
    assert tokenizer_of(trainer, module) is data  # only the datamodule's renders chats
    module.tokenizer = tokenizer("{{ messages }}")
    assert tokenizer_of(trainer, module) is module.tokenizer  # the same template: the module's, as documented
    module.tokenizer = tokenizer("{{ other }}")
    with pytest.raises(ValueError, match="carry different chat templates"):
        tokenizer_of(trainer, module)
    assert tokenizer_of(SimpleNamespace(datamodule=None), module) is module.tokenizer
