"""InstructionDataModule: instruction data from files or the hub, rendered with the model's chat template."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from rg_lightning.chat import (IGNORE_INDEX, ChatFormatError, check_template_syntax, encode_conversation, encode_text,
                               require_chat_template, with_template_defaults)
from rg_lightning.loading import load_tokenizer
from rg_lightning.sources import load_source, parse_source

Format = Literal["auto", "messages", "prompt_completion", "alpaca", "text"]
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


class EpochSeededSampler(torch.utils.data.Sampler):
    """A shuffle fixed by (seed, epoch): every process and every resumed run draws the same order for an epoch."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class StartPosition:
    """Where a training loader's first iterator starts (a checkpoint's loader state, or None): one object shared by
    the loader and the copy Lightning makes of it with a distributed sampler (an init argument kept as an attribute),
    and settable until that iterator draws its first batch, because a strategy that restores the checkpoint after
    ``configure_optimizers`` (FSDP, ModelParallel) hands the position over after the loader and its iterator exist."""

    def __init__(self, state: dict | None = None) -> None:
        self.state, self.started = state, False


class ResumableLoader(DataLoader):
    """The training loader. Lightning saves its ``state_dict`` with every checkpoint (the epoch, and how many of its
    batches the training steps consumed) and a resumed fit goes on with the next batch of that epoch's order; a
    plain loader would start the epoch again, training its first batches twice and never its last ones.
    ``progress()``: batches of the current epoch whose training step ran, and whether the last of them ended the
    epoch (the trainer's count, not this loader's, which runs ahead by what the fetcher and the workers prefetch)."""

    def __init__(self, *args, progress=None, resume: StartPosition | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.progress, self.resume = progress, resume if resume is not None else StartPosition()
        if self.resume.state is not None:
            self.load_state_dict(self.resume.state)

    def state_dict(self) -> dict:
        epoch = int(getattr(self.sampler, "epoch", 0))
        batches, ended = self.progress() if self.progress else (0, False)
        # an epoch that ended: the resumed fit starts the next one, with the iterator it makes first
        return {"epoch": epoch + 1, "batches": 0} if ended else {"epoch": epoch, "batches": int(batches)}

    def load_state_dict(self, state: dict) -> None:
        # the epoch now, before the first iterator: workers draw their indices as soon as it exists, before
        # Lightning sets the epoch
        _set_sampler_epoch(self, state["epoch"])
        self.resume.state = state

    def __iter__(self):
        return _StartsAtFirstBatch(self)

    def _iterator_from_position(self):
        """The real iterator, made at the first batch: the position and the sampler's epoch are final by then."""
        state, self.resume.state, self.resume.started = self.resume.state, None, True
        if state is not None:
            _set_sampler_epoch(self, state["epoch"])
        iterator = super().__iter__()
        for _ in range(state["batches"] if state is not None else 0):  # those the checkpointed run trained on
            if next(iterator, _END) is _END:
                break
        return iterator


class _StartsAtFirstBatch:
    """An iterator that makes the loader's real one (workers included) when its first batch is asked for."""

    def __init__(self, loader: ResumableLoader) -> None:
        self._loader, self._iterator = loader, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._loader._iterator_from_position()
        return next(self._iterator)


_END = object()


def detect_format(columns: list[str]) -> str:
    """The first known format whose columns are all present."""
    for name, needed in FORMAT_COLUMNS.items():
        if all(column in columns for column in needed):
            return name
    known = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in FORMAT_COLUMNS.items())
    raise ValueError(
        f"Cannot tell the data format from columns {sorted(columns)}. Known formats ({known}). "
        "Map your columns with `columns={'prompt': 'question', 'completion': 'answer'}` or set `format=`."
    )


def to_messages(row: dict, fmt: str, system_prompt: str | None) -> list[dict] | None:
    """One row as a chat conversation (None for plain text)."""
    if fmt == "text":
        return None
    if fmt == "messages":
        turns = row["messages"]
        if not isinstance(turns, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in turns):
            raise ChatFormatError("`messages` must be a list of {role, content} turns (ShareGPT's {from, value} "
                                  "turns need converting first).")
        messages = [dict(m) for m in turns]  # other keys too: Qwen3's template renders `reasoning_content`
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    else:
        instruction = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": row["output"]}]
    for turn, message in enumerate(messages):
        content = message["content"]
        if not isinstance(content, str):
            hint = (" (TRL's conversational prompt/completion rows hold message lists: give them as one `messages` "
                    "column)" if isinstance(content, (list, dict)) else " (map labels to answer words, or cast the "
                    "column to text)" if isinstance(content, (int, float)) else "")
            raise ChatFormatError(f"the {message['role']} turn {turn} is a {type(content).__name__}, not text{hint}.")
        if message["role"] == "user" and not content.strip():
            raise ChatFormatError(f"the user turn {turn} is empty: there is no request to answer.")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def _row_messages(row: dict, fmt: str, system_prompt: str | None, index: int) -> list[dict] | None:
    """:func:`to_messages`, its errors naming the row."""
    try:
        return to_messages(row, fmt, system_prompt)
    except ChatFormatError as err:
        raise ChatFormatError(f"Row {index}: {err}") from None


class InstructionDataModule(L.LightningDataModule):
    """Tokenised instruction data with labels on the assistant answers only.

    Args:
        train: Training data: a local json/jsonl/csv/tsv/parquet file or a hub id (``owner/name[:config][@split]``).
        val: Validation data, same forms. Leave empty and set ``val_fraction`` to hold out part of ``train``.
        test: Test data, same forms.
        format: ``auto`` (detect from columns), ``messages``, ``prompt_completion``, ``alpaca`` or ``text``.
        columns: Rename map from canonical names to your columns, e.g. ``{"prompt": "question"}``.
        tokenizer: Hub id or directory of the tokenizer; default: the tokenizer of the LightningModule.
        chat_template: Jinja template replacing the tokenizer's own, installed like ``chat_template_kwargs``: the
            LightningModule's tokenizer gets it too, so generation, the basis pass and an export use it.
        chat_template_kwargs: Variables the chat template reads, e.g. ``{"enable_thinking": false}`` so Qwen3 answers
            without a reasoning block. The template (with these as its defaults) is installed on the tokenizer, and
            on the LightningModule's when that is another one, at ``setup``: the basis pass, generation, judges and
            an exported model render prompts exactly as the training rows were.
        system_prompt: System message put before every conversation (it changes results: it is logged).
        max_length: Truncate every sample to this many tokens.
        val_fraction: Share of ``train`` held out for validation when ``val`` is not given.
        batch_size: Samples per batch and device.
        num_workers: DataLoader worker processes.
        seed: Seed of the train/validation split and of the per-epoch shuffle.
        mix: Rows mixed into the training data, same forms as ``train`` in any chat format (detected from its
            columns; ``columns`` does not apply): e.g. harmful requests answered with refusals, the
            safety-data mixing defence. On the miniature worlds RefusalGuard on such data (10% of the rows) kept
            both refusal goals on all 12 worlds; the data alone refused harmless requests on four
            (experiments/results/README.md).
        mix_fraction: Share of the training rows (after the validation split) drawn from ``mix``, added to
            the user's rows (none dropped); ``mix`` is cycled through in a seeded order when it is smaller.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        format: Format = "auto",
        columns: dict[str, str] | None = None,
        tokenizer: str | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
        system_prompt: str | None = None,
        max_length: int = 1024,
        val_fraction: float = 0.0,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
        mix: str | None = None,
        mix_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        if format not in ("auto", *FORMAT_COLUMNS):
            raise ValueError(f"format must be one of {['auto', *FORMAT_COLUMNS]}, got {format!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val and val_fraction:
            raise ValueError("Give either `val` or `val_fraction`, not both.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0.0 <= mix_fraction < 1.0 or bool(mix) != bool(mix_fraction):
            raise ValueError(f"Give `mix` together with a `mix_fraction` in (0, 1) (or neither); got {mix!r} and "
                             f"{mix_fraction}.")
        if columns is not None and not (isinstance(columns, dict)
                                        and all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items())):
            raise ValueError(f"`columns` maps canonical names to yours, e.g. {{'prompt': 'question'}}; got {columns!r}")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise ValueError(f"`chat_template_kwargs` must be a mapping, e.g. {{'enable_thinking': false}}; got "
                             f"{chat_template_kwargs!r}")
        if chat_template is not None:
            check_template_syntax(chat_template)
        self.sources = {
            stage: parse_source(text, default_split=split)
            for stage, text, split in (("train", train, "train"), ("val", val, "validation"), ("test", test, "test"))
            if text
        }
        self.format = format
        self.columns = dict(columns or {})
        self.tokenizer_name = tokenizer
        self.chat_template = chat_template
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._installed_template: str | None = None
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.mix = parse_source(mix, default_split="train") if mix else None
        self.mix_fraction = mix_fraction
        self._mixed = False  # the mix rows are added to the training rows once
        self._mix_rows = None
        self._tokenizer = None
        self.datasets: dict[str, list[dict]] = {}
        self._train_loader: ResumableLoader | None = None
        self._pending_loader_state: dict | None = None  # a checkpoint's, for the next training loader
        self.prompts: list[str | list[dict]] = []
        # tokenizer=None means "the module's": not recording it keeps Lightning's merge of module and data
        # hyperparameters from seeing two different `tokenizer` values.
        self.save_hyperparameters(ignore=["tokenizer"] if tokenizer is None else None)

    # -- tokenizer -------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The tokenizer used for rendering; callbacks read it as ``trainer.datamodule.tokenizer``."""
        if self._tokenizer is None:
            if self.tokenizer_name:
                self._tokenizer = load_tokenizer(self.tokenizer_name)
            elif self.trainer is not None and getattr(self.trainer.lightning_module, "tokenizer", None) is not None:
                self._tokenizer = self.trainer.lightning_module.tokenizer
            else:
                raise RuntimeError(
                    "InstructionDataModule has no tokenizer: pass `tokenizer=` or attach it to a Trainer whose "
                    "LightningModule has a `tokenizer` attribute."
                )
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer = value

    def install_chat_template(self) -> None:
        """Put ``chat_template`` (with ``chat_template_kwargs`` as defaults) on the tokenizer and on the
        LightningModule's, so everything that renders a prompt renders it as the training rows were. Without
        either argument the tokenizers are left as they are."""
        if self.chat_template is None and not self.chat_template_kwargs:
            return
        tokenizers = [self.tokenizer]
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if getattr(module, "tokenizer", None) is not None and module.tokenizer is not self.tokenizer:
            tokenizers.append(module.tokenizer)
        if self._installed_template is None or self.tokenizer.chat_template != self._installed_template:
            base = require_chat_template(self.tokenizer, self.chat_template)
            self._installed_template = with_template_defaults(base, self.chat_template_kwargs,
                                                              passed=set(self.tokenizer.special_tokens_map))
        for tokenizer in tokenizers:
            tokenizer.chat_template = self._installed_template

    # -- data ------------------------------------------------------------------------------------------------
    def load_rows(self, stage: str):
        """The raw rows of one stage as a ``datasets.Dataset``; subclasses may generate them instead."""
        return load_source(self.sources[stage])

    def available_stages(self) -> list[str]:
        return list(self.sources)

    def setup(self, stage: str | None = None) -> None:
        self.install_chat_template()
        if stage == "fit":  # a fit's loader position comes from its own checkpoint, restored after this, or none
            self._train_loader, self._pending_loader_state = None, None
        if stage == "predict":
            if "test" not in self.available_stages():
                raise RuntimeError("`predict` answers the prompts of the test data: pass `test=` to the data module.")
            self.prompts = self.prompts or self.requests(self.load_rows("test"))
            return
        # validation held out of `train` (val_fraction) needs `train` to split, also for `validate` alone
        held_out = ("train",) if self.val_fraction else ()
        wanted = {"fit": ("train", "val"), "validate": ("val", *held_out), "test": ("test",)}
        for name in wanted.get(stage, ("train", "val", "test")) if stage else ("train", "val", "test"):
            if name in self.datasets or name not in self.available_stages():
                continue
            self.datasets[name] = self.encode(self.load_rows(name), name)
        if "train" in self.datasets and self.val_fraction and "val" not in self.datasets:
            rows = self.datasets["train"]
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = max(1, int(round(len(rows) * self.val_fraction)))
            if n_val >= len(rows):
                raise ValueError(f"val_fraction={self.val_fraction} of {len(rows)} training rows leaves none to train "
                                 "on; lower it or give more rows (or a separate `val`).")
            self.datasets["val"] = [rows[i] for i in order[:n_val]]
            self.datasets["train"] = [rows[i] for i in order[n_val:]]
        if "train" in self.datasets and self.mix is not None and not self._mixed:
            self.datasets["train"] = self.datasets["train"] + self._mixed_rows(len(self.datasets["train"]))
            self._mixed = True

    def _mixed_rows(self, n_user: int) -> list[dict]:
        """``mix_fraction`` of the final training rows, from ``mix``, cycled in a seeded order; only the rows
        drawn are tokenised."""
        dataset = self._mix_dataset()
        n_mix = int(round(n_user * self.mix_fraction / (1.0 - self.mix_fraction)))
        if n_mix == 0:
            rank_zero_warn(f"`mix_fraction` {self.mix_fraction} of {n_user} training rows rounds to no `mix` row; "
                           "raise it or give more training data.")
            return []
        generator = torch.Generator().manual_seed(self.seed + 1)
        order: list[int] = []
        while len(order) < n_mix:
            order += torch.randperm(len(dataset), generator=generator).tolist()
        drawn = sorted(set(order[:n_mix]))
        encoded = dict(zip(drawn, self._named("mix", lambda: self.encode(dataset.select(drawn), "mix", own_format=True,
                                                                          rows=drawn))))
        return [encoded[i] for i in order[:n_mix]]

    def _mix_dataset(self):
        """The ``mix`` rows, loaded once (training and ``SafetyEvaluation`` both read them)."""
        if self._mix_rows is None:
            self._mix_rows = load_source(self.mix)
            if len(self._mix_rows) == 0:
                raise ValueError(f"The `mix` data {self.mix} has no rows.")
        return self._mix_rows

    def mix_prompts(self) -> list[str]:
        """The user requests of the ``mix`` rows (none without ``mix``): what the model is trained to answer,
        so ``SafetyEvaluation`` leaves them out of the benchmarks it scores."""
        if self.mix is None:
            return []
        dataset = self._mix_dataset()
        return self._named("mix", lambda: self.user_prompts(dataset, own_format=True))

    def _named(self, what: str, work):
        """Run ``work``; errors say which data they are about (``mix`` rows are checked in their own format)."""
        try:
            return work()
        except ValueError as err:
            raise type(err)(f"`{what}` data {self.mix.label}: {err}") from err

    def _normalise(self, dataset, stage: str, own_format: bool = False):
        """Rename mapped columns and check the format's columns are present; returns (dataset, format).
        ``own_format``: detect the format from the columns, no renames (the ``mix`` data)."""
        if own_format:
            try:
                fmt = detect_format(dataset.column_names)
            except ValueError:
                fmt = None
            if fmt in (None, "text"):
                needed = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in FORMAT_COLUMNS.items()
                                   if name != "text")
                raise ValueError(f"it needs chat columns ({needed}) under these names (`columns` and `format` apply "
                                 f"to the training data only); it has {dataset.column_names}.")
            return dataset, fmt
        missing = [actual for actual in self.columns.values() if actual not in dataset.column_names]
        if missing:
            raise ValueError(
                f"{stage} data has no column(s) {missing} named in `columns`; it has {dataset.column_names}."
            )
        rename = {actual: canonical for canonical, actual in self.columns.items() if actual != canonical}
        if rename:
            dataset = dataset.rename_columns(rename)
        fmt = detect_format(dataset.column_names) if self.format == "auto" else self.format
        missing = [column for column in FORMAT_COLUMNS[fmt] if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"{stage} data in format {fmt!r} needs column(s) {missing}; it has {dataset.column_names}. "
                "Map them with `columns=`."
            )
        return dataset, fmt

    def requests(self, dataset, own_format: bool = False) -> list[str | list[dict]]:
        """What `lightning predict` answers, per row: the conversation up to its last user turn (earlier turns and
        the row's own system turn kept), or just that turn's text when it is the whole conversation."""
        dataset, fmt = self._normalise(dataset, "test", own_format)
        if fmt == "text":
            raise ValueError("`predict` needs chat data (messages, prompt/completion or alpaca), not plain text.")
        requests = []
        for index, row in enumerate(dataset):
            messages = _row_messages(row, fmt, None, index)
            last = max(i for i, m in enumerate(messages) if m["role"] == "user")
            requests.append(messages[0]["content"] if last == 0 else messages[:last + 1])
        return requests

    def user_prompts(self, dataset, own_format: bool = False) -> list[str]:
        """The last user turn of every row as text (the requests the ``mix`` rows answer)."""
        return [r if isinstance(r, str) else r[-1]["content"] for r in self.requests(dataset, own_format)]

    def encode(self, dataset, stage: str, own_format: bool = False, rows: list[int] | None = None) -> list[dict]:
        """Validate the columns and tokenise every row (errors name the row: its index in the file, ``rows[i]``
        when ``dataset`` is a selection of it)."""
        dataset, fmt = self._normalise(dataset, stage, own_format)
        tokenizer = self.tokenizer
        if fmt != "text":
            require_chat_template(tokenizer)
        encoded = []
        for position, row in enumerate(dataset):
            index = position if rows is None else rows[position]
            messages = _row_messages(row, fmt, self.system_prompt, index)
            if messages is None:
                encoded.append(encode_text(tokenizer, row["text"], max_length=self.max_length, row=index))
            else:
                encoded.append(
                    encode_conversation(tokenizer, messages, max_length=self.max_length, row=index)
                )
        cut = sum(sample.pop("answer_cut") for sample in encoded)
        if cut:
            rank_zero_warn(f"{stage} data: {cut} of {len(encoded)} rows end past max_length={self.max_length} and "
                           "lose their last tokens (a chat answer its end-of-turn token, which teaches the model not "
                           "to stop). Raise `max_length` or drop the longest rows.")
        return encoded

    # -- loaders ---------------------------------------------------------------------------------------------
    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """Right padding for training: positions stay aligned with the causal mask from the first token."""
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        width = max(len(sample["input_ids"]) for sample in samples)

        def padded(key: str, value: int) -> torch.Tensor:
            return torch.tensor([s[key] + [value] * (width - len(s[key])) for s in samples], dtype=torch.long)

        return {
            "input_ids": padded("input_ids", pad_id),
            "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", IGNORE_INDEX),
        }

    def _loader(self, stage: str, shuffle: bool) -> DataLoader:
        if stage not in self.datasets:
            raise RuntimeError(f"No {stage} data: pass `{stage}=` (a file or hub id) to the data module.")
        rows = self.datasets[stage]
        # their own generator: making an iterator then draws nothing from torch's global one, which dropout uses (a
        # resumed fit makes its iterators at other moments than the uninterrupted one)
        kwargs = dict(batch_size=self.batch_size, collate_fn=self.collate, num_workers=self.num_workers,
                      generator=torch.Generator().manual_seed(self.seed))
        if not shuffle:
            return DataLoader(rows, **kwargs)
        loader = ResumableLoader(rows, sampler=EpochSeededSampler(len(rows), self.seed), progress=self._batches_trained,
                                 resume=StartPosition(self._pending_loader_state), **kwargs)
        self._pending_loader_state, self._train_loader = None, loader
        return loader

    def state_dict(self) -> dict:
        """The training loader's position, also kept here: Lightning hands a checkpoint's loader state only to a
        loader built after it restores the loops, but a module that reads ``trainer.estimated_stepping_batches`` in
        ``configure_optimizers`` (``lr_schedule``) makes the loader before that, and the resumed epoch would start
        over. The data module's state is restored before ``configure_optimizers`` (the next loader starts there) or,
        under strategies that restore after it (FSDP, ModelParallel), before the loader's first batch."""
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        state = state_dict.get("train_loader")
        if state is not None and self._train_loader is not None and not self._train_loader.resume.started:
            # restored after the loader was made (FSDP / ModelParallel restore after `configure_optimizers`, which
            # built it for `estimated_stepping_batches`): that loader, not yet drawn from, starts there
            self._train_loader.load_state_dict(state)
        else:
            self._pending_loader_state = state

    def _batches_trained(self) -> tuple[int, bool]:
        """Training batches of the current epoch whose step ran, and whether the epoch ended with the last of them
        (what a checkpoint's loader state records)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, False
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return progress.current.processed, bool(progress.is_last_batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Batches of prompt strings; the module renders and left-pads them for generation."""
        return DataLoader(self.prompts, batch_size=self.batch_size, shuffle=False, collate_fn=list)
