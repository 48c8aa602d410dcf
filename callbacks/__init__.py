"""RefusalGuard callbacks, installed as ``rg_lightning.callbacks``."""
