"""rg-lightning: RefusalGuard for PyTorch Lightning."""

from rg_lightning.data import InstructionDataModule
from rg_lightning.module import CausalLMModule

__all__ = ["CausalLMModule", "InstructionDataModule"]
__version__ = "0.1.0"
