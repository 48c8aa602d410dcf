"""Where rows come from: a local file or a Hugging Face hub dataset, both through ``datasets.load_dataset``.

A source string is either a path to a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.tsv`` / ``.parquet`` file,
or a hub id with an optional config and split: ``"owner/name"``, ``"owner/name:config"``,
``"owner/name@split"``, ``"owner/name:config@split"``, or a local directory holding a copy of a hub dataset
repository (read like a hub id, its ``train`` split).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?(@[\w.\[\]:%+-]+)?$")


@dataclass(frozen=True)
class Source:
    """A parsed source string."""

    path: str | None = None
    hub_id: str | None = None
    config: str | None = None
    split: str | None = None

    @property
    def label(self) -> str:
        return self.path or f"{self.hub_id}{':' + self.config if self.config else ''}"


def parse_source(text: str, default_split: str = "train") -> Source:
    """Tell a local file from a hub id; reject strings that are neither, naming the fix."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("A data source must be a non-empty string: a local file or a hub dataset id.")
    text = os.path.expanduser(text.strip())
    extension = os.path.splitext(text)[1].lower()
    if os.path.isdir(text):  # a local copy of a hub dataset repository: ``datasets`` reads its data files
        return Source(hub_id=text, split=default_split)
    if os.path.exists(text) or extension in LOCAL_BUILDERS:
        if not os.path.isfile(text):
            raise FileNotFoundError(
                f"Data file {text!r} does not exist. Give an existing .json/.jsonl/.csv/.tsv/.parquet file "
                "or a hub dataset id such as 'tatsu-lab/alpaca'."
            )
        if extension not in LOCAL_BUILDERS:
            raise ValueError(
                f"Cannot read {text!r}: unknown file type {extension!r}; use one of {sorted(LOCAL_BUILDERS)}."
            )
        return Source(path=text, split="train")
    if not _HUB_ID.match(text):
        raise FileNotFoundError(
            f"Data source {text!r} is neither an existing file nor a hub dataset id "
            "('owner/name', optionally ':config' and '@split')."
        )
    rest, _, split = text.partition("@")
    hub_id, _, config = rest.partition(":")
    return Source(hub_id=hub_id, config=config or None, split=split or default_split)


def load_source(source: Source):
    """Load the rows of a source as a ``datasets.Dataset`` and refuse an empty one."""
    import datasets

    if source.path is not None:
        builder = LOCAL_BUILDERS[os.path.splitext(source.path)[1].lower()]
        kwargs = {"delimiter": "\t"} if source.path.lower().endswith(".tsv") else {}
        if builder == "csv":  # an empty cell is missing, but a prompt that reads "NA", "null" or "None" is text
            kwargs.update(keep_default_na=False, na_values=[""])
        try:
            dataset = datasets.load_dataset(builder, data_files=source.path, split="train", **kwargs)
        except Exception as error:  # datasets raises many types for malformed files
            if os.path.getsize(source.path) == 0 or "corresponds to no data" in str(error):
                raise ValueError(f"Dataset {source.label!r} has no rows; give a file with data.") from error
            raise ValueError(f"Could not read data file {source.path!r}: {error}") from error
    else:
        dataset = datasets.load_dataset(source.hub_id, source.config, split=source.split)
    if len(dataset) == 0:
        raise ValueError(f"Dataset {source.label!r} has no rows; give a file or split with data.")
    return dataset
