import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import write_jsonl
from rg_lightning import CausalLMModule, InstructionDataModule


def adamw(lr=1e-2):
    return lambda params: torch.optim.AdamW(params, lr=lr)


def trainer(tmp_path, steps=3, **kwargs):
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(max_steps=steps, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, **kwargs)


def fit(tmp_path, model_dir, chat_file, steps=3, **module_kwargs):
    L.seed_everything(0)
    module = CausalLMModule(model=model_dir, optimizer=adamw(), **module_kwargs)
    data = InstructionDataModule(train=chat_file, val_fraction=0.25, batch_size=4)
    trainer(tmp_path, steps, limit_val_batches=1).fit(module, data)
    return module


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fit_updates_weights_for_each_family(tmp_path, tiny_models, chat_file, family, mode):
    lora = {"lora_r": 4, "lora_target_modules": ["q_proj", "v_proj", "down_proj"]} if mode == "lora" else {}
    tokenizer = {"tokenizer": tiny_models["llama"]} if family == "qwen2" else {}  # word-level tokenizer, see conftest
    module = fit(tmp_path, tiny_models[family], chat_file, **lora, **tokenizer)
    initial = AutoModelForCausalLM.from_pretrained(tiny_models[family])
    trained = module.model.merge_and_unload() if mode == "lora" else module.model
    changed = [name for name, p in trained.state_dict().items()
               if not torch.equal(p, initial.state_dict()[name])]
    assert changed, "fitting changed nothing"
    if mode == "lora":
        assert all(any(t in name for t in ("q_proj", "v_proj", "down_proj")) for name in changed)
    assert torch.isfinite(torch.tensor([p.abs().sum() for p in trained.parameters()])).all()


def test_qlora_4bit_trains_only_adapters(tmp_path, tiny_models, chat_file):
    pytest.importorskip("bitsandbytes")
    module = fit(tmp_path, tiny_models["llama"], chat_file, lora_r=4, quantization="nf4",
                    lora_target_modules="all-linear")
    import bitsandbytes as bnb

    quantized = [m for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized, "base linears were not loaded in 4 bit"
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(p.abs().sum() > 0 for n, p in module.model.named_parameters() if "lora_B" in n)


class _TrainingModes(L.Callback):
    """Per training step: whether every module of the HF model is in training mode, and how often the first
    decoder layer's attention runs (twice when gradient checkpointing recomputes the layer in backward)."""

    def __init__(self):
        self.all_training, self.layer_calls, self._calls = [], [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.all_training.append(all(m.training for m in pl_module.model.modules()))
        self._calls = 0
        if not hasattr(self, "_hook"):
            layer = next(m for n, m in pl_module.model.named_modules() if n.endswith("layers.0.self_attn"))
            self._hook = layer.register_forward_hook(lambda *_: setattr(self, "_calls", self._calls + 1))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.layer_calls.append(self._calls)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_runs_in_train_mode_and_checkpointing_recomputes(tmp_path, tiny_models, chat_file, checkpointing):
    modes = _TrainingModes()
    module = CausalLMModule(model=tiny_models["llama"], optimizer=adamw(), lora_r=4, lora_dropout=0.1,
                            gradient_checkpointing=checkpointing)
    data = InstructionDataModule(train=chat_file, val_fraction=0.25, batch_size=4)
    trainer(tmp_path, 2, val_check_interval=1, limit_val_batches=1, callbacks=[modes]).fit(module, data)
    assert modes.all_training == [True, True]  # LoRA dropout on, also after a validation pass
    assert modes.layer_calls == [2 if checkpointing else 1] * 2
    assert module.model.is_gradient_checkpointing == checkpointing


@pytest.mark.parametrize("lora_r, lora_dropout, normalization", [(0, 0.0, "batch"), (4, 0.0, "batch"),
                                                                  (4, 0.1, "batch"), (0, 0.0, "token")])
def test_resume_from_mid_fit_checkpoint_matches_uninterrupted(tmp_path, tiny_models, chat_file, lora_r, lora_dropout,
                                                              normalization):
    """With dropout too: the checkpoint carries the random state the next step's masks come from; and the `token`
    normalisation's loss scale, taken from the fit's first batch, not the resumed fit's."""
    train = chat_file
    if normalization == "token":  # answers of other lengths, so batches hold other numbers of answer tokens
        answers = ["sure .", "sure here you go .", "cannot help with that , sorry , not at all ."]
        train = str(write_jsonl(tmp_path / "lengths.jsonl", [
            {"messages": [{"role": "user", "content": f"how do i bake a cake {i} ?"},
                          {"role": "assistant", "content": answers[i % 3] if i < 8 else answers[i % 2]}]}
            for i in range(16)]))

    def run(root, steps, ckpt_path=None):
        L.seed_everything(0)
        module = CausalLMModule(model=tiny_models["llama"], optimizer=adamw(), lora_r=lora_r, lora_dropout=lora_dropout,
                                loss_normalization=normalization)
        data = InstructionDataModule(train=train, batch_size=8)  # two steps per epoch
        checkpoint = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1)
        trainer(root, steps, callbacks=[checkpoint], enable_checkpointing=True).fit(module, data, ckpt_path=ckpt_path)
        return module

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "crashed", 2)
    saved = next((tmp_path / "crashed").glob("*step=2.ckpt"))
    state = torch.load(saved, weights_only=True, map_location="cpu")["state_dict"]
    if lora_r:
        assert state and all("lora_" in key for key in state), "LoRA checkpoints should hold adapters only"
    resumed = run(tmp_path / "resumed", 4, ckpt_path=str(saved))
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert resumed._token_reference == straight._token_reference


class FirstStepRandomState(L.Callback):
    """The torch random state the first training step draws its dropout masks from."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "state"):
            self.state = torch.get_rng_state()


def test_a_checkpoints_random_state_reaches_only_the_fit_that_resumes_from_it(tmp_path, tiny_models, chat_file):
    def data():
        return InstructionDataModule(train=chat_file, val_fraction=0.5, batch_size=4)

    def module():
        return CausalLMModule(model=tiny_models["llama"], optimizer=adamw(), lora_r=4, lora_dropout=0.1)

    L.seed_everything(0)
    trainer(tmp_path, 1, enable_checkpointing=True, limit_val_batches=1,
            callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]).fit(module(), data())
    saved = tmp_path / "ckpt" / "last.ckpt"
    first_steps = []
    for ckpt_path in (None, str(saved)):  # validate the model as it is, or from the checkpoint; then a new fit
        reused, first_step = module(), FirstStepRandomState()
        trainer(tmp_path, 1, limit_val_batches=1).validate(reused, data(), ckpt_path=ckpt_path)
        L.seed_everything(1)
        trainer(tmp_path, 1, callbacks=[first_step], limit_val_batches=0).fit(reused, data())
        first_steps.append(first_step.state)
    assert torch.equal(*first_steps)  # the validate run's checkpoint did not reseed the later fit

    checkpoint = torch.load(saved, weights_only=True, map_location="cpu")
    checkpoint["torch_rng_states"] = checkpoint["torch_rng_states"] * 2  # as saved by two processes
    torch.save(checkpoint, tmp_path / "two.ckpt")
    kept = FirstStepRandomState()
    L.seed_everything(1)
    with pytest.warns(UserWarning, match="random states of 2 processes and this run has 1"):
        trainer(tmp_path, 2, callbacks=[kept], limit_val_batches=0).fit(module(), data(),
                                                                        ckpt_path=str(tmp_path / "two.ckpt"))
    assert not torch.equal(kept.state, checkpoint["torch_rng_states"][0]["cpu"])  # not one process's state for all


def test_adapter_checkpoint_of_other_target_modules_is_refused(tmp_path, tiny_models, chat_file):
    L.seed_everything(0)
    module = CausalLMModule(model=tiny_models["llama"], optimizer=adamw(), lora_r=4, lora_target_modules=["q_proj"])
    data = InstructionDataModule(train=chat_file, batch_size=8)
    trainer(tmp_path, 1, enable_checkpointing=True,
            callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]).fit(module, data)
    other = CausalLMModule(model=tiny_models["llama"], lora_r=4, lora_target_modules=["o_proj"])
    with pytest.raises(ValueError, match="adapter does not fit"):
        trainer(tmp_path, 1).test(other, InstructionDataModule(test=chat_file, batch_size=8),
                                  ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for changed in ({"lora_alpha": 64}, {"lora_r": 8}):  # another scale leaves no trace in the weights' names
        other = CausalLMModule(model=tiny_models["llama"], lora_target_modules=["q_proj"], **{"lora_r": 4, **changed})
        with pytest.raises(ValueError, match=f"other LoRA settings.*{next(iter(changed))}"):
            trainer(tmp_path, 1).test(other, InstructionDataModule(test=chat_file, batch_size=8),
                                      ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    same = CausalLMModule(model=tiny_models["llama"], lora_r=4, lora_target_modules=["q_proj"])
    trainer(tmp_path, 1).test(same, InstructionDataModule(test=chat_file, batch_size=8),
                              ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for (name, a), (_, b) in zip(module.model.named_parameters(), same.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_schedule_reaches_zero_at_the_fits_last_step(tmp_path, tiny_models, chat_file, schedule):
    seen = []

    class Rates(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx % 2 == 0:  # the first micro-batch of each optimizer step
                seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    module = CausalLMModule(model=tiny_models["llama"], optimizer=adamw(lr=0.1), lora_r=4, lr_schedule=schedule,
                            warmup_steps=2)
    data = InstructionDataModule(train=chat_file, batch_size=2)  # 16 rows: 8 micro-batches, 4 optimizer steps
    run = L.Trainer(max_epochs=3, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                    logger=False, enable_checkpointing=False, accumulate_grad_batches=2, default_root_dir=tmp_path,
                    callbacks=[Rates()])
    run.fit(module, data)
    assert len(seen) == 12  # 3 epochs x 4 optimizer steps, sized without being told
    torch.testing.assert_close(seen[:3], [0.0, 0.05, 0.1])  # warm-up, then the decay from the full rate
    torch.testing.assert_close(seen[7], 0.05)  # halfway through the 10 decay steps (both shapes)
    torch.testing.assert_close(seen[-1], 0.01 if schedule == "linear" else 0.05 * (1 + math.cos(0.9 * math.pi)))
    assert run.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_token_normalisation_gives_the_gradient_of_the_mean_over_every_answer_token(tmp_path, tiny_models):
    class Record(L.Callback):
        def __init__(self):
            self.batches, self.grads = [], []

        def on_train_start(self, trainer, pl_module):
            def keep(optimizer, *_):  # after the step: the closure (backward, hooks) runs inside it
                self.grads.append({n: p.grad.clone() for n, p in pl_module.model.named_parameters()})
            trainer.optimizers[0].register_step_post_hook(keep)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches.append({k: v.clone() for k, v in batch.items()})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    record = Record()
    record.losses = []
    L.seed_everything(0)
    module = CausalLMModule(model=tiny_models["llama"], optimizer=adamw(), loss_normalization="token")
    initial = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).state_dict().items()}
    answers = ["sure .", "sure here you go . sure here you go .", "cannot help with that .", "go ."]
    rows = [{"prompt": "how do i bake a cake ?", "completion": answers[i % 4]} for i in range(7)]
    data = InstructionDataModule(train=write_jsonl(tmp_path / "uneven.jsonl", rows), batch_size=3)
    trainer(tmp_path, 1, accumulate_grad_batches=2, callbacks=[record]).fit(module, data)
    reference = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    reference.load_state_dict(initial)
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in record.batches[:2]]
    assert counts[0] != counts[1]  # so the mean of the micro-batch means ("batch") would differ
    total = sum(reference(**b).loss * n for b, n in zip(record.batches[:2], counts)) / sum(counts)
    total.backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(record.grads[0][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # what is backpropagated stays on a mean loss's scale (the first micro-batch's is its mean), not the token sum,
    # which would overflow fp16 under 16-mixed
    with torch.no_grad():
        first, second = (float(reference(**b).loss) for b in record.batches[:2])
    assert record.losses[0] * 2 == pytest.approx(first, rel=1e-3)  # Lightning reports it divided by accumulation
    assert record.losses[1] * 2 == pytest.approx(second * counts[1] / counts[0], rel=1e-3)
    with pytest.raises(ValueError, match="loss_normalization"):
        CausalLMModule(model=tiny_models["llama"], loss_normalization="sample")


def test_lr_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="either `scheduler` or `lr_schedule`"):
        CausalLMModule(model="Qwen/Qwen2.5-7B-Instruct", lr_schedule="linear",
                       scheduler=lambda o: torch.optim.lr_scheduler.LinearLR(o))
    with pytest.raises(ValueError, match="needs an lr_schedule"):
        CausalLMModule(model="Qwen/Qwen2.5-7B-Instruct", warmup_steps=10)
    with pytest.raises(ValueError, match="lr_schedule must be"):
        CausalLMModule(model="Qwen/Qwen2.5-7B-Instruct", lr_schedule="step")


def test_export_does_not_persist_a_pad_token_borrowed_from_eos(tmp_path, tiny_models):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from conftest import CHAT_TEMPLATE, SPECIALS, WORDS

    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    padless = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|end|>")  # like Llama 3
    padless.chat_template = CHAT_TEMPLATE
    padless.save_pretrained(tmp_path / "padless")
    module = CausalLMModule(model=tiny_models["llama"], tokenizer=str(tmp_path / "padless"))
    module.configure_model()
    assert module.tokenizer.pad_token == "<|end|>"  # borrowed for batching
    module.export(str(tmp_path / "export"))
    assert AutoTokenizer.from_pretrained(tmp_path / "export").pad_token is None
    assert module.tokenizer.pad_token == "<|end|>"  # the run's own tokenizer keeps it
    module = CausalLMModule(model=tiny_models["llama"])  # a tokenizer with its own pad token keeps it
    module.configure_model()
    module.export(str(tmp_path / "export2"))
    assert AutoTokenizer.from_pretrained(tmp_path / "export2").pad_token == module.tokenizer.pad_token == "<pad>"


@pytest.mark.parametrize("merged", [True, False])
def test_export_writes_a_loadable_hf_directory(tmp_path, tiny_models, chat_file, merged):
    module = fit(tmp_path, tiny_models["llama"], chat_file, lora_r=4, gradient_checkpointing=True,
                    export_dir=str(tmp_path / "export"), export_merged=merged)
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert "tokenizer.json" in files
    if merged:  # the cache was off for checkpointing only: the export has it back, the trained model keeps it off
        assert AutoConfig.from_pretrained(tmp_path / "export").use_cache and not module.model.config.use_cache
    if merged:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
        expected = module.model.merge_and_unload()
        for (name, a), (_, b) in zip(expected.state_dict().items(), reloaded.state_dict().items()):
            torch.testing.assert_close(a, b, msg=name)
    else:
        assert "adapter_model.safetensors" in files
    assert not list(tmp_path.glob(".staging-*")), "staging directory left behind"


def test_generate_is_greedy_and_restores_state(tiny_models):
    module = CausalLMModule(model=tiny_models["llama"])
    module.configure_model()
    module.configure_model()  # idempotent
    model = module.model
    model.train()
    first = module.generate(["how do i bake a cake ?", "what is one plus two ?"], max_new_tokens=4)
    second = module.generate(["how do i bake a cake ?"], max_new_tokens=4)
    assert first[0] == second[0] and len(first) == 2
    assert model.training and module.tokenizer.padding_side == "right" and module.model is model


def test_bad_model_inputs_name_the_fix(tmp_path, tiny_models):
    with pytest.raises(FileNotFoundError, match=r"not an existing directory.*read from the current directory"):
        CausalLMModule(model="./models/does-not-exist")
    with pytest.raises(FileNotFoundError, match=r"use an id\.$"):  # an absolute path: nothing about the directory
        CausalLMModule(model=str(tmp_path / "does" / "not-exist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CausalLMModule(model=str(tmp_path / "empty"))
    (tmp_path / "empty" / "adapter_config.json").write_text("{}")  # a LoRA export, not a model
    with pytest.raises(FileNotFoundError, match="holds a LoRA adapter.*base_model_name_or_path"):
        CausalLMModule(model=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="lora_r"):
        CausalLMModule(model=tiny_models["llama"], quantization="nf4")
    with pytest.raises(ValueError, match="dtype"):
        CausalLMModule(model=tiny_models["llama"], dtype="float8")
    with pytest.raises(RuntimeError, match="configure_model"):
        CausalLMModule(model=tiny_models["llama"]).generate(["hi"])
    with pytest.raises(ValueError, match="lora_alpha must be positive"):
        CausalLMModule(model=tiny_models["llama"], lora_r=4, lora_alpha=0)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        CausalLMModule(model=tiny_models["llama"], lora_r=4, lora_dropout=1.5)
    with pytest.warns(UserWarning, match="lora_r is 0: this is full fine-tuning"):
        CausalLMModule(model=tiny_models["llama"], lora_dropout=0.1, lora_target_modules=["q_proj"])


def test_a_data_module_with_its_own_tokenizer_fits_with_a_logger(tmp_path, tiny_models, chat_file):
    from lightning.pytorch.loggers import CSVLogger

    module = CausalLMModule(model=tiny_models["llama"], optimizer=adamw(), lora_r=4)  # the model's own tokenizer
    data = InstructionDataModule(train=chat_file, batch_size=4, tokenizer=tiny_models["llama"])
    trainer(tmp_path, 1, logger=CSVLogger(tmp_path)).fit(module, data)  # the hparams of both are merged
    assert module.trainer.global_step == 1


def test_a_plateau_scheduler_steps_on_the_validation_loss(tmp_path, tiny_models, chat_file):
    from lightning.pytorch.cli import ReduceLROnPlateau

    module = CausalLMModule(model=tiny_models["llama"], optimizer=adamw(), lora_r=4,
                            scheduler=lambda o: ReduceLROnPlateau(o, monitor="val/loss", patience=0, factor=0.5))
    data = InstructionDataModule(train=chat_file, val_fraction=0.25, batch_size=4)
    run = trainer(tmp_path, 6, limit_val_batches=1)
    run.fit(module, data)
    config = run.lr_scheduler_configs[0]
    assert (config.monitor, config.interval) == ("val/loss", "epoch")
    # validation counted in batches (as the recipes do): the scheduler steps right after each validation
    module = CausalLMModule(model=tiny_models["llama"], optimizer=adamw(), lora_r=4,
                            scheduler=lambda o: ReduceLROnPlateau(o, monitor="val/loss", patience=0, factor=0.5))
    run = trainer(tmp_path, 6, limit_val_batches=1, val_check_interval=2, check_val_every_n_epoch=None)
    run.fit(module, InstructionDataModule(train=chat_file, val_fraction=0.25, batch_size=4))
    config = run.lr_scheduler_configs[0]
    assert (config.interval, config.frequency) == ("step", 2)
    assert config.scheduler.last_epoch >= 2  # it stepped on the validation loss (each call counts one)


def test_dtype_auto_loads_the_weights_as_saved(tmp_path, tiny_models):
    saved = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.bfloat16)
    saved.save_pretrained(tmp_path / "bf16")
    module = CausalLMModule(model=str(tmp_path / "bf16"), tokenizer=tiny_models["llama"])  # dtype: auto
    module.configure_model()
    assert module.model.dtype == torch.bfloat16


def test_a_batch_without_answer_tokens_counts_for_nothing(tmp_path, tiny_models, chat_file):
    """A custom data module's batch with every label masked: HF's mean loss is 0/0. It must neither put NaN into
    the gradients nor into the epoch's validation mean."""
    class OneMaskedBatch(InstructionDataModule):
        def _masked(self, loader):
            batches = [dict(batch) for batch in loader]
            batches[0]["labels"] = torch.full_like(batches[0]["labels"], -100)
            return torch.utils.data.DataLoader(batches, batch_size=None)

        def train_dataloader(self):
            return self._masked(super().train_dataloader())

        def val_dataloader(self):
            return self._masked(super().val_dataloader())

    module = CausalLMModule(model=tiny_models["llama"], optimizer=adamw())
    run = trainer(tmp_path, 4, limit_val_batches=2)  # one epoch: 8 training rows, then validation
    run.fit(module, OneMaskedBatch(train=chat_file, val_fraction=0.5, batch_size=2))
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    assert math.isfinite(float(run.callback_metrics["val/loss"]))


def test_an_export_directory_holding_other_files_is_refused_before_training(tmp_path, tiny_models, chat_file):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds other files"):
        fit(tmp_path, tiny_models["llama"], chat_file, steps=1, lora_r=4, export_dir=str(tmp_path / "run"))
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"
