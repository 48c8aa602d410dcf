"""rg-lightning: RefusalGuard for PyTorch Lightning."""

from rg_lightning.data import InstructionDataModule
from rg_lightning.module import CausalLMModule
from rg_lightning.predictions import PredictionWriter

__all__ = ["CausalLMModule", "InstructionDataModule", "PredictionWriter"]
__version__ = "0.1.0"
