"""Where models and tokenizers come from: a local directory or a hub id, checked before any download."""

from __future__ import annotations

import os
import re

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_source(name: str, what: str = "model") -> None:
    """Fail early on a path that does not exist, before any download is attempted."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"`{what}` must be a hub id like 'Qwen/Qwen2.5-7B-Instruct' or a local directory.")
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise ValueError(f"`{what}`={name!r} is a file; give the directory holding config.json.")
        if what == "model" and os.path.isfile(os.path.join(name, "adapter_config.json")) \
                and not os.path.isfile(os.path.join(name, "config.json")):
            raise FileNotFoundError(
                f"`{what}` directory {name!r} holds a LoRA adapter, not a model: give its base model (the adapter's "
                "`base_model_name_or_path`) as `model` and continue from the run's checkpoint with `--ckpt_path`, "
                "or merge the adapter into the base model first.")
        if what == "model" and not os.path.isfile(os.path.join(name, "config.json")):
            raise FileNotFoundError(f"`{what}` directory {name!r} has no config.json; is it a Hugging Face model?")
        return
    if not _HUB_ID.match(name):
        relative = "" if os.path.isabs(name) else (
            f" A relative path is read from the current directory ({os.getcwd()}); the shipped experiments/*.yaml "
            "are run from the repository root.")
        raise FileNotFoundError(
            f"`{what}`={name!r} is not an existing directory nor a hub id ('owner/name'). Fix the path or use an "
            f"id.{relative}")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """A tokenizer from a hub id or directory, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    check_model_source(name, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
