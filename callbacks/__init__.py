"""RefusalGuard callbacks, installed as ``rg_lightning.callbacks``.

They work with any LightningModule that exposes its Hugging Face causal LM as ``self.model`` (or an
``hf_model()`` method, attribute or property) and a tokenizer as ``self.tokenizer`` (or on the datamodule); see
``rg_lightning.contract``.
"""

from rg_lightning.callbacks.drift import DriftGeometry
from rg_lightning.callbacks.evaluation import SafetyEvaluation
from rg_lightning.callbacks.feedback import RefusalFeedback
from rg_lightning.callbacks.projection import RepresentationProjection
from rg_lightning.callbacks.refusal_directions import RefusalDirections

__all__ = ["DriftGeometry", "RefusalDirections", "RefusalFeedback", "RepresentationProjection", "SafetyEvaluation"]
