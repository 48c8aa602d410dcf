"""The `lightning` command: fit / validate / test / predict through LightningCLI, generic over any
LightningModule and LightningDataModule (``model.class_path`` / ``data.class_path``).

Other subcommands are handed to another installed ``lightning`` console script (the optional cloud
package ships one), so installing rg-lightning takes nothing away.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import entry_points

from lightning.pytorch.cli import LightningCLI

SUBCOMMANDS = ("fit", "validate", "test", "predict")
OWN_ENTRY_POINT = "rg_lightning.cli:main"


class RefusalGuardCLI(LightningCLI):
    """LightningCLI in subclass mode; the optimizer is a constructor argument of the module."""

    def __init__(self, args=None, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            args=args,
            **kwargs,
        )

    def instantiate_classes(self) -> None:
        """A constructor's refusal of a configured value (``batch_size: 0``, a missing prompt file) ends the command
        with that message and the class that refused it, instead of under jsonargparse's traceback of its type
        checks. Other exceptions (a bug, not a value) keep their traceback."""
        try:
            super().instantiate_classes()
        except (ValueError, OSError) as error:
            self.parser.error(f"the configuration was refused: {constructor_errors(error)}")

    def _parse_ckpt_path(self) -> None:
        """The config and the command line decide the module's arguments, also with ``--ckpt_path``. LightningCLI
        would overwrite them with the hyperparameters saved in the checkpoint, explicit flags included: another
        machine's model path, the first run's ``export_dir`` (which a resumed run's export would then replace).
        ``CausalLMModule.on_load_checkpoint`` checks that the checkpoint's adapters fit the module."""


def constructor_errors(error: Exception) -> str:
    """The constructor's own message in a jsonargparse error, which lists one error per type the value could have
    had (for an optional class: the class's, then "Expected a <class 'NoneType'>"; for a callback: the class's,
    then the other forms a callback may be given in)."""
    text = str(error)
    if "Errors:" not in text:
        return text
    listed = [line.strip()[2:] for line in text.split("Errors:", 1)[1].splitlines() if line.strip().startswith("- ")]
    own = [line for line in listed if not line.startswith("Expected a <class 'NoneType'>")]
    refused = re.search(r"class_path='([\w.]+)'", text)
    return (refused.group(1).rsplit(".", 1)[-1] + ": " if refused else "") + (own or listed or [text])[0]


def other_lightning_command():
    """The entry point of another package's `lightning` console script, if one is installed."""
    for entry in entry_points(group="console_scripts", name="lightning"):
        if entry.value.replace(" ", "") != OWN_ENTRY_POINT:
            return entry.load()
    return None


def main(argv: list[str] | None = None) -> None:
    given = argv is not None
    argv = list(argv if given else sys.argv[1:])
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        delegate = other_lightning_command()
        if delegate is None:
            sys.exit(
                f"lightning: unknown subcommand {argv[0]!r}; rg-lightning provides {', '.join(SUBCOMMANDS)} "
                "(e.g. `lightning fit --config experiments/tiny.yaml`)."
            )
        sys.argv = [sys.argv[0], *argv]
        sys.exit(delegate())
    RefusalGuardCLI(args=argv if given else None)
