import json
import warnings

import lightning as L
import pytest
import torch

from conftest import make_tokenizer, write_jsonl
from rg_lightning import InstructionDataModule
from rg_lightning.chat import IGNORE_INDEX, ChatFormatError

QA = {"prompt": "how do i bake a cake ?", "completion": "sure here you go ."}


def build(tmp_path, rows, name="data.jsonl", **kwargs):
    path = tmp_path / name
    write_jsonl(path, rows)
    module = InstructionDataModule(train=str(path), **kwargs)
    module.tokenizer = make_tokenizer()
    module.setup("fit")
    return module


def answer_tokens(module, sample):
    tok = module.tokenizer
    return tok.convert_ids_to_tokens([t for t in sample["labels"] if t != IGNORE_INDEX])


@pytest.mark.parametrize(
    "row",
    [
        {"messages": [{"role": "user", "content": QA["prompt"]}, {"role": "assistant", "content": QA["completion"]}]},
        QA,
        {"instruction": "how do i bake a cake", "input": "", "output": QA["completion"]},
    ],
    ids=["messages", "prompt_completion", "alpaca"],
)
def test_every_chat_format_labels_exactly_the_answer(tmp_path, row):
    module = build(tmp_path, [row] * 3)
    sample = module.datasets["train"][0]
    assert answer_tokens(module, sample) == ["sure", "here", "you", "go", ".", "<|end|>"]
    prompt_tokens = module.tokenizer.convert_ids_to_tokens(sample["input_ids"][: sample["labels"].count(IGNORE_INDEX)])
    assert prompt_tokens[0] == "<|user|>" and prompt_tokens[-1] == "<|assistant|>"


def test_alpaca_input_is_appended_to_instruction(tmp_path):
    module = build(tmp_path, [{"instruction": "tell me", "input": "about cake", "output": "sure ."}])
    text = module.tokenizer.decode(module.datasets["train"][0]["input_ids"])
    assert "tell me" in text and "about cake" in text


def test_multi_turn_labels_every_assistant_turn(tmp_path):
    messages = [
        {"role": "system", "content": "you help"},
        {"role": "user", "content": "what is one plus two ?"},
        {"role": "assistant", "content": "three"},
        {"role": "user", "content": "and two plus two ?"},
        {"role": "assistant", "content": "four"},
    ]
    module = build(tmp_path, [{"messages": messages}])
    assert answer_tokens(module, module.datasets["train"][0]) == ["three", "<|end|>", "four", "<|end|>"]


def test_plain_text_learns_every_token(tmp_path):
    module = build(tmp_path, [{"text": "tell me a story about a cake"}])
    sample = module.datasets["train"][0]
    assert sample["labels"] == sample["input_ids"]
    assert sample["input_ids"][-1] == module.tokenizer.eos_token_id


def test_column_mapping_and_other_file_types(tmp_path):
    import pandas as pd

    frame = pd.DataFrame([{"question": QA["prompt"], "answer": QA["completion"]}] * 4)
    for name, write in (("d.csv", frame.to_csv), ("d.parquet", frame.to_parquet)):
        write(tmp_path / name, index=False)
    frame.to_csv(tmp_path / "d.tsv", sep="\t", index=False)
    for name in ("d.csv", "d.parquet", "d.tsv"):
        module = InstructionDataModule(train=str(tmp_path / name),
                                       columns={"prompt": "question", "completion": "answer"})
        module.tokenizer = make_tokenizer()
        module.setup("fit")
        assert len(module.datasets["train"]) == 4
        assert answer_tokens(module, module.datasets["train"][0])[:2] == ["sure", "here"]


def test_system_prompt_is_rendered(tmp_path):
    module = build(tmp_path, [QA], system_prompt="you help")
    assert module.tokenizer.convert_ids_to_tokens(module.datasets["train"][0]["input_ids"])[:3] == [
        "<|system|>", "you", "help"]


def test_truncation_keeps_max_length(tmp_path):
    module = build(tmp_path, [{"prompt": "how do i", "completion": "sure here you go . " * 20}], max_length=12)
    assert len(module.datasets["train"][0]["input_ids"]) == 12


def test_collate_pads_right_with_masked_labels(tmp_path):
    module = build(tmp_path, [QA, {"prompt": "how", "completion": "sure ."}])
    batch = module.collate(module.datasets["train"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = batch["attention_mask"][1]
    assert short[0] == 1 and short[-1] == 0  # right padding
    assert (batch["labels"][1][short == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1][short == 0] == module.tokenizer.pad_token_id).all()


def test_val_fraction_split_is_deterministic_and_disjoint(tmp_path):
    rows = [{"prompt": f"what is {w} {v} ?", "completion": "sure ."} for w in ("one", "two", "three", "four", "five")
            for v in ("cake", "story")]  # ten different rows
    first = build(tmp_path, rows, val_fraction=0.3, seed=3)
    second = build(tmp_path, rows, val_fraction=0.3, seed=3)
    other = build(tmp_path, rows, val_fraction=0.3, seed=4)

    def ids(split):
        return {tuple(row["input_ids"]) for row in split}

    val, train = ids(first.datasets["val"]), ids(first.datasets["train"])
    assert len(val) == 3 and len(train) == 7 and not val & train  # disjoint, and together every row
    assert first.datasets["val"] == second.datasets["val"] and ids(other.datasets["val"]) != val


def test_shuffle_depends_only_on_seed_and_epoch(tmp_path):
    rows = [{"prompt": f"what is {w} ?", "completion": "sure ."} for w in ("one", "two", "three", "four", "five")]
    module = build(tmp_path, rows, batch_size=5)
    orders = []
    for global_seed in (1, 2):
        L.seed_everything(global_seed)
        loader = module.train_dataloader()
        first = next(iter(loader))["input_ids"]
        loader.sampler.set_epoch(1)
        orders.append((first, next(iter(loader))["input_ids"]))
    assert torch.equal(orders[0][0], orders[1][0]) and torch.equal(orders[0][1], orders[1][1])
    assert not torch.equal(orders[0][0], orders[0][1])


def test_tokenizer_comes_from_the_trainers_module(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [QA])
    module = InstructionDataModule(train=path)
    holder = L.LightningModule()
    holder.tokenizer = make_tokenizer()
    trainer = L.Trainer(logger=False, accelerator="cpu")
    trainer.strategy.connect(holder)
    module.trainer = trainer
    assert module.tokenizer is holder.tokenizer


# -- bad inputs: each names what to fix --------------------------------------------------------------------
def test_missing_columns_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="columns="):
        build(tmp_path, [{"question": "x", "answer": "y"}])
    with pytest.raises(ValueError, match="no column"):
        build(tmp_path, [QA], columns={"prompt": "question"})
    with pytest.raises(ValueError, match="needs column"):
        build(tmp_path, [QA], format="alpaca")


def test_empty_dataset_is_refused(tmp_path):
    (tmp_path / "empty.csv").write_text("prompt,completion\n")
    module = InstructionDataModule(train=str(tmp_path / "empty.csv"))
    module.tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match="no rows"):
        module.setup("fit")


def test_missing_file_and_bad_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InstructionDataModule(train=str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="neither"):
        InstructionDataModule(train="not a / valid // id")


def test_tokenizer_without_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [QA])
    module = InstructionDataModule(train=path)
    module.tokenizer = make_tokenizer(chat_template=None)
    with pytest.raises(ChatFormatError, match="no chat template"):
        module.setup("fit")
    module = InstructionDataModule(train=path, chat_template=make_tokenizer().chat_template)
    module.tokenizer = make_tokenizer(chat_template=None)
    module.setup("fit")  # an explicit template is enough
    assert module.datasets["train"]


# Qwen3's shape: the trained answer carries an empty reasoning block, the generation prompt only when
# `enable_thinking` is false (otherwise the model writes its reasoning first).
THINKING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> <think> </think> {{ m['content'] }} <|end|> "
    "{% else %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and enable_thinking is false %}"
    " <think> </think>{% endif %}{% endif %}"
)


def test_chat_template_kwargs_reach_every_renderer(tmp_path):
    from types import SimpleNamespace

    from rg_lightning.chat import render_prompt

    path = write_jsonl(tmp_path / "d.jsonl", [QA] * 2)
    module_tokenizer = make_tokenizer(THINKING_TEMPLATE)
    data = InstructionDataModule(train=path, chat_template_kwargs={"enable_thinking": False})
    data.tokenizer = make_tokenizer(THINKING_TEMPLATE)  # the data's own tokenizer, another object than the module's
    data.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=module_tokenizer))
    data.setup("fit")
    for tokenizer in (data.tokenizer, module_tokenizer):  # the callbacks render with the module's
        assert render_prompt(tokenizer, "how ?").endswith("<|assistant|> <think> </think>")
        # a caller that passes the variable still decides
        assert tokenizer.apply_chat_template([{"role": "user", "content": "how ?"}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True).endswith("<|assistant|>")
    # labels: the answer after the empty block, as the model will be asked to continue
    assert answer_tokens(data, data.datasets["train"][0]) == ["sure", "here", "you", "go", ".", "<|end|>"]
    installed = module_tokenizer.chat_template
    data.setup("validate")
    assert module_tokenizer.chat_template == installed  # set up again: the defaults are not stacked

    other = make_tokenizer()  # the data module used with another model: its tokenizer gets the template too
    data.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=other))
    data.setup("test")
    assert other.chat_template == installed

    replaced = InstructionDataModule(train=path, chat_template=THINKING_TEMPLATE)  # a template alone is installed too
    replaced.tokenizer = make_tokenizer()
    module_tokenizer = make_tokenizer()
    replaced.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=module_tokenizer))
    replaced.setup("fit")
    assert replaced.tokenizer.chat_template == module_tokenizer.chat_template == THINKING_TEMPLATE

    plain = InstructionDataModule(train=path)
    plain.tokenizer = make_tokenizer(THINKING_TEMPLATE)
    plain.setup("fit")
    assert plain.tokenizer.chat_template == THINKING_TEMPLATE  # nothing asked, nothing installed
    assert answer_tokens(plain, plain.datasets["train"][0])[:2] == ["<unk>", "<unk>"]  # the block is learned


@pytest.mark.parametrize("kwargs, message", [
    ({"enable_thinkng": False}, "does not read 'enable_thinkng'"),
    ({"enable_thinking": None}, "give a bool, finite number or string"),
    ({"enable_thinking": float("inf")}, "give a bool, finite number or string"),
    ({"not a name": 1}, "must be identifiers"),
    ({"tools": []}, "passed to the chat template on every call"),
    ({"eos_token": "x"}, "passed to the chat template on every call"),  # a special token of the tokenizer
])
def test_bad_chat_template_kwargs_are_named(tmp_path, kwargs, message):
    data = InstructionDataModule(train=write_jsonl(tmp_path / "d.jsonl", [QA]), chat_template_kwargs=kwargs)
    data.tokenizer = make_tokenizer(THINKING_TEMPLATE)
    with pytest.raises(ValueError, match=message):
        data.setup("fit")
    assert data.tokenizer.chat_template == THINKING_TEMPLATE


def test_template_defaults_keep_the_template_output(tmp_path):
    from rg_lightning.chat import with_template_defaults

    messages = [{"role": "user", "content": "how ?"}]
    # a leading newline (trim_blocks) and indentation before a block tag (lstrip_blocks) render as before
    for template in ("\n" + THINKING_TEMPLATE, "  " + THINKING_TEMPLATE):
        tokenizer = make_tokenizer(with_template_defaults(template, {"enable_thinking": True}))
        expected = make_tokenizer(template).apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                                 enable_thinking=True)
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
        assert with_template_defaults(template, {}) == template
    # Llama 3.1 sets `date_string` only where the caller gave none: a default is honoured; one it always sets is not
    dated = '{% if not date_string is defined %}{% set date_string = "26 Jul 2024" %}{% endif %}{{ date_string }}'
    assert make_tokenizer(with_template_defaults(dated, {"date_string": "1 Jan"})).apply_chat_template(
        messages, tokenize=False) == "1 Jan"
    with pytest.raises(ValueError, match="sets 'day' itself"):
        with_template_defaults('{% set day = "monday" %}{{ day }}', {"day": "sunday"})


def test_answerless_rows_name_the_row(tmp_path):
    with pytest.raises(ChatFormatError, match="Row 1: assistant turn 1 is empty"):
        build(tmp_path, [QA, {"prompt": "how", "completion": "  "}])
    with pytest.raises(ChatFormatError, match="Row 0: the conversation has no assistant turn"):
        build(tmp_path, [{"messages": [{"role": "user", "content": "how"}]}])
    with pytest.raises(ChatFormatError, match="max_length=4"):
        build(tmp_path, [QA], max_length=4)


def test_rows_whose_answer_is_cut_warn_and_keep_their_start(tmp_path):
    # "how do i bake a cake ?" renders to 10 prompt tokens; the answer and its end token follow
    with pytest.warns(UserWarning, match="1 of 2 rows end past max_length=12"):
        module = build(tmp_path, [QA, {"prompt": "how", "completion": "sure ."}], max_length=12)
    cut = module.datasets["train"][0]
    assert len(cut["input_ids"]) == 12 and answer_tokens(module, cut) == ["sure", "here"]
    assert set(cut) == {"input_ids", "attention_mask", "labels"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(tmp_path, [QA], max_length=64)  # nothing cut, nothing said


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="format"):
        InstructionDataModule(format="csv")
    with pytest.raises(ValueError, match="val_fraction"):
        InstructionDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="not both"):
        path = write_jsonl(tmp_path / "d.jsonl", [QA])
        InstructionDataModule(train=path, val=path, val_fraction=0.1)
    with pytest.raises(ValueError, match="`columns` maps canonical names to yours"):
        InstructionDataModule(columns=["prompt"])
    with pytest.raises(ValueError, match="`chat_template_kwargs` must be a mapping"):
        InstructionDataModule(chat_template_kwargs=["enable_thinking"])
    with pytest.raises(ValueError, match="`chat_template` must be a Jinja template"):
        InstructionDataModule(chat_template="")
    with pytest.raises(ValueError, match=r"`chat_template` is not valid Jinja \(line 1\)"):
        InstructionDataModule(chat_template="{{ broken")


def test_hub_ids_parse_without_download():
    module = InstructionDataModule(train="openai/gsm8k:main@train", test="tatsu-lab/alpaca")
    assert module.sources["train"].hub_id == "openai/gsm8k"
    assert module.sources["train"].config == "main" and module.sources["train"].split == "train"
    assert module.sources["test"].split == "test"


def test_predict_prompts_are_user_turns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [QA, {"prompt": "what is two plus two ?", "completion": "four"}])
    module = InstructionDataModule(test=path, batch_size=1)
    module.setup("predict")
    assert list(module.predict_dataloader()) == [[QA["prompt"]], ["what is two plus two ?"]]
    json.dumps(module.prompts)


def test_predict_keeps_a_rows_earlier_turns_and_own_system_turn(tmp_path):
    """A multi-turn row is answered in its context, and a row's own system turn wins over the data's."""
    from rg_lightning.chat import render_prompt

    turns = [{"role": "system", "content": "be brief ."}, {"role": "user", "content": "what is one ?"},
             {"role": "assistant", "content": "one ."}, {"role": "user", "content": "and two ?"},
             {"role": "assistant", "content": "two ."}]
    single = [{"role": "user", "content": QA["prompt"]}, {"role": "assistant", "content": QA["completion"]}]
    module = InstructionDataModule(test=write_jsonl(tmp_path / "d.jsonl", [{"messages": turns}, {"messages": single}]),
                                   system_prompt="write a poem .")
    module.setup("predict")
    assert module.prompts == [turns[:4], QA["prompt"]]
    tokenizer = make_tokenizer()
    rendered = render_prompt(tokenizer, module.prompts[0], system_prompt="write a poem .")
    assert "be brief ." in rendered and "what is one ?" in rendered and "write a poem ." not in rendered
    assert "write a poem ." in render_prompt(tokenizer, module.prompts[1], system_prompt="write a poem .")


def test_mix_adds_its_share_of_refusal_rows_to_the_training_rows_only(tmp_path):
    """mix_fraction of the final training rows come from `mix` (cycled, seeded); validation keeps user rows."""
    rows = [{"question": f"what is {w} ?", "answer": "sure ."} for w in ("one", "two", "three", "four", "five")] * 2
    refusals = write_jsonl(tmp_path / "refusals.jsonl", [  # its own format; `columns` is the main data's
        {"messages": [{"role": "user", "content": "how do i make a bomb ?"},
                      {"role": "assistant", "content": "cannot help with that ."}]}])
    kwargs = dict(columns={"prompt": "question", "completion": "answer"}, val_fraction=0.2, seed=3)
    plain = build(tmp_path, rows, **kwargs)
    mixed = build(tmp_path, rows, mix=refusals, mix_fraction=0.5, **kwargs)
    assert mixed.datasets["val"] == plain.datasets["val"]
    assert mixed.datasets["train"][:8] == plain.datasets["train"]  # the user's rows, all kept
    added = mixed.datasets["train"][8:]
    assert len(added) == 8  # half of the 16 training rows, the single mix row cycled
    assert all(answer_tokens(mixed, sample)[:3] == ["cannot", "help", "with"] for sample in added)
    mixed.setup("test")
    assert len(mixed.datasets["train"]) == 16  # mixed once, whatever the stages
    small = build(tmp_path, rows, mix=refusals, mix_fraction=0.1, **kwargs)
    assert len(small.datasets["train"]) == 8 + 1  # round(8 * 0.1 / 0.9)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mix="x.jsonl"), "mix_fraction"),
    (dict(mix_fraction=0.1), "mix"),
    (dict(mix="x.jsonl", mix_fraction=1.0), "mix_fraction"),
])
def test_mix_needs_a_source_and_a_share_below_one(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InstructionDataModule(train="t.jsonl", **kwargs)


def test_mix_data_must_be_chat_rows_under_their_own_names(tmp_path):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "just words"}])
    with pytest.raises(ValueError, match="`mix` data .*chat columns"):
        build(tmp_path, [QA] * 4, mix=text, mix_fraction=0.2)
    renamed = write_jsonl(tmp_path / "qa.jsonl", [{"question": "how do i make a bomb ?", "answer": "cannot ."}])
    with pytest.raises(ValueError, match="apply to the training data only"):
        build(tmp_path, [{"question": "what is one ?", "answer": "sure ."}] * 4, mix=renamed, mix_fraction=0.2,
              columns={"prompt": "question", "completion": "answer"})
    empty_answer = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "how do i make a bomb ?", "completion": ""}])
    with pytest.raises(ValueError, match="`mix` data"):
        build(tmp_path, [QA] * 4, mix=empty_answer, mix_fraction=0.2)


def test_a_mix_share_that_rounds_to_no_row_warns(tmp_path):
    refusals = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "how do i make a bomb ?", "completion": "cannot ."}])
    with pytest.warns(UserWarning, match="rounds to no `mix` row"):
        module = build(tmp_path, [QA] * 8, mix=refusals, mix_fraction=0.01)
    assert len(module.datasets["train"]) == 8


def test_validate_alone_holds_out_the_val_fraction(tmp_path):
    """`lightning validate` with `val_fraction` (the recipes' 0.02) splits `train` too, else it validates nothing."""
    rows = [{"prompt": f"what is {w} ?", "completion": "sure ."} for w in ("one", "two", "three", "four", "five")] * 2
    fit = build(tmp_path, rows, val_fraction=0.3, seed=3)
    alone = InstructionDataModule(train=str(tmp_path / "data.jsonl"), val_fraction=0.3, seed=3)
    alone.tokenizer = make_tokenizer()
    alone.setup("validate")
    assert alone.datasets["val"] == fit.datasets["val"] and len(alone.val_dataloader()) > 0


@pytest.mark.parametrize("row, message", [
    ({"prompt": [{"role": "user", "content": "how"}], "completion": [{"role": "assistant", "content": "sure"}]},
     "Row 0: the user turn 0 is a list, not text .*one `messages` column"),
    ({"prompt": "is this good ?", "completion": 1}, "Row 0: the assistant turn 1 is a int, not text .*map labels"),
    ({"prompt": "  ", "completion": "sure ."}, "Row 0: the user turn 0 is empty"),
    ({"messages": [{"from": "human", "value": "how"}, {"from": "gpt", "value": "sure"}]},
     "Row 0: `messages` must be a list of \\{role, content\\} turns .*ShareGPT"),
], ids=["trl-conversational", "int-label", "empty-request", "sharegpt"])
def test_rows_that_are_not_chat_text_name_the_row_and_the_fix(tmp_path, row, message):
    with pytest.raises(ChatFormatError, match=message):
        build(tmp_path, [row])


def test_a_rendered_text_row_ending_with_its_end_token_gets_no_second_one(tmp_path):
    # a Qwen-style rendering ends "<|im_end|>\n": the end token is already there, before the newline's token
    from tokenizers import pre_tokenizers

    tokenizer = make_tokenizer()
    tokenizer._tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")  # "\n" stays a token
    assert tokenizer("story <|end|>\n")["input_ids"][-1] != tokenizer.eos_token_id
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "tell me a story <|end|>\n"}, {"text": "tell me a story"}])
    module = InstructionDataModule(train=str(path))
    module.tokenizer = tokenizer
    module.setup("fit")
    rendered, plain = (module.datasets["train"][i]["input_ids"] for i in range(2))
    assert rendered.count(module.tokenizer.eos_token_id) == 1
    assert plain[-1] == module.tokenizer.eos_token_id


def test_a_rendered_text_row_keeps_one_bos(tmp_path):
    from tokenizers import processors

    tokenizer = make_tokenizer()
    tokenizer.bos_token = "<|user|>"  # any special token serves as this tokenizer's BOS, added like Llama's
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|user|> $A", special_tokens=[("<|user|>", tokenizer.bos_token_id)])
    assert tokenizer("tell")["input_ids"][0] == tokenizer.bos_token_id
    module = InstructionDataModule(train=str(write_jsonl(tmp_path / "t.jsonl", [{"text": "<|user|> tell me a story"}])))
    module.tokenizer = tokenizer
    module.setup("fit")
    ids = module.datasets["train"][0]["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1


def test_mix_errors_name_the_file_and_its_row(tmp_path):
    bad = write_jsonl(tmp_path / "mix.jsonl", [{"prompt": f"request {i} ?", "completion": ""} for i in range(8)])
    module = InstructionDataModule(train=str(write_jsonl(tmp_path / "d.jsonl", [QA] * 4)), mix=str(bad),
                                   mix_fraction=0.2)
    module.tokenizer = make_tokenizer()
    from rg_lightning.sources import load_source

    with pytest.raises(ChatFormatError, match="Row 5: assistant turn 1 is empty"):
        module.encode(load_source(module.mix).select([5]), "mix", own_format=True, rows=[5])
    with pytest.raises(ValueError, match=f"`mix` data {bad}: Row \\d"):
        module.setup("fit")


def test_a_template_that_refuses_system_turns_names_the_setting(tmp_path):
    from rg_lightning.chat import render_prompt

    gemma_like = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                  "{% endif %}{% for m in messages %}<|user|> {{ m['content'] }} <|end|>{% endfor %}<|assistant|>")
    tokenizer = make_tokenizer(gemma_like)
    assert render_prompt(tokenizer, "tell me").startswith("<|user|> tell me")
    with pytest.raises(ChatFormatError, match="System role not supported.*`system_prompt`"):
        render_prompt(tokenizer, "tell me", system_prompt="be brief")


class _RecordsBatches(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(tuple(map(tuple, batch["input_ids"].tolist())))
        return self.weight.square().sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SizesItsSchedule(_RecordsBatches):
    """As CausalLMModule with ``lr_schedule``: reading the step count builds the training loader before Lightning
    restores the loops, so Lightning never hands that loader the checkpoint's position."""

    def configure_optimizers(self):
        assert self.trainer.estimated_stepping_batches > 0
        return super().configure_optimizers()


@pytest.mark.parametrize("workers, module_type", [(0, _RecordsBatches), (1, _RecordsBatches), (0, _SizesItsSchedule)],
                         ids=["in-process", "worker", "sized-schedule"])
def test_a_resumed_fit_trains_on_exactly_the_batches_the_interrupted_one_had_left(tmp_path, workers, module_type):
    """Mid-epoch (step 9 of 6-batch epochs) and at an epoch's end (step 6): the resumed fit sees what the straight
    one saw from there, neither repeating the epoch's first batches nor skipping its last ones. Workers draw their
    indices before Lightning sets the epoch, so the restored epoch must be set first."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    rows = [{"prompt": f"{w} {v} ?", "completion": f"sure {w} ."} for w in ("cake", "bomb", "story", "poem")
            for v in ("bake", "cook", "make", "build", "tell", "write")]  # 24 rows: 6 batches of 4 per epoch
    path = write_jsonl(tmp_path / "rows.jsonl", rows)

    def fit(epochs, ckpt_path=None, checkpoint=None, max_steps=-1):
        data = InstructionDataModule(train=str(path), batch_size=4, seed=3, num_workers=workers)
        data.tokenizer = make_tokenizer()
        module = module_type()
        callbacks = [checkpoint] if checkpoint else []
        L.Trainer(max_epochs=epochs, max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=bool(checkpoint), callbacks=callbacks,
                  default_root_dir=tmp_path).fit(module, data, ckpt_path=ckpt_path)
        return module.seen

    straight = fit(3)
    fit(2, checkpoint=ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1,
                                      filename="{step}"), max_steps=9)
    for step in (6, 9):
        assert fit(3, ckpt_path=str(tmp_path / "ckpt" / f"step={step}.ckpt")) == straight[step:], step


def test_a_fits_position_comes_from_its_own_checkpoint_only(tmp_path):
    """A loader built before the fit (by hand, or by an earlier fit that never drew a batch) must not take the
    checkpoint's position away from the one the fit builds; a position restored for `validate` (from its
    checkpoint) must not reach a later fit that starts fresh."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"{w} {v} ?", "completion": f"sure {w} ."}
                                                 for w in ("cake", "bomb", "story", "poem")
                                                 for v in ("bake", "cook", "make", "build", "tell", "write")])

    def fit(data, ckpt_path=None, checkpoint=None, max_steps=-1):
        module = _SizesItsSchedule()
        L.Trainer(max_epochs=2, max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=bool(checkpoint),
                  callbacks=[checkpoint] if checkpoint else [], default_root_dir=tmp_path).fit(
            module, data, ckpt_path=ckpt_path)
        return module.seen

    def data():
        module = InstructionDataModule(train=str(path), batch_size=4, seed=3)
        module.tokenizer = make_tokenizer()
        return module

    straight = fit(data())
    fit(data(), checkpoint=ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1,
                                           filename="{step}"), max_steps=9)
    built_early = data()
    built_early.setup("fit")
    assert len(built_early.train_dataloader()) == 6
    assert fit(built_early, ckpt_path=str(tmp_path / "ckpt" / "step=9.ckpt")) == straight[9:]
    validated = data()
    validated.load_state_dict({"train_loader": {"epoch": 1, "batches": 3}})  # as `validate(ckpt_path=...)` does
    assert fit(validated) == straight


def test_a_strategy_that_restores_after_configure_optimizers_resumes_at_the_same_batch(tmp_path):
    """ModelParallelStrategy restores the checkpoint after ``configure_optimizers``, which already built the loader
    and its iterator for ``estimated_stepping_batches``: the position must still reach it before its first batch."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, str(here / "fsdp2_loader_position.py"), str(tmp_path)], cwd=here,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    straight = seen.pop("straight")
    assert len(straight) == 12 and sorted(seen) == ["3", "6", "9"]
    for step, resumed in seen.items():
        assert resumed == straight[int(step):], step


def test_the_restored_position_survives_lightnings_distributed_copy_of_the_loader(tmp_path):
    """Under DDP Lightning rebuilds the training loader with a distributed sampler from its init arguments: a
    position restored through the data module must be one of them."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.utilities.data import _update_dataloader

    data = InstructionDataModule(train=str(write_jsonl(tmp_path / "rows.jsonl", [QA] * 24)), batch_size=4, seed=3)
    data.tokenizer = make_tokenizer()
    data.setup("fit")
    data.load_state_dict({"train_loader": {"epoch": 2, "batches": 3}})
    loader = data.train_dataloader()
    copy = _update_dataloader(loader, DistributedSamplerWrapper(loader.sampler, num_replicas=2, rank=1,
                                                                shuffle=False))
    assert (copy.resume.state["batches"], loader.sampler.epoch) == (3, 2)
    assert data.train_dataloader().resume.state is None  # the restored position is for the first loader only


def test_template_errors_name_the_row_and_turns_keep_their_other_keys(tmp_path):
    alternating = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                   "<|{{ m['role'] }}|> {{ m['content'] }} {% if m.get('reasoning_content') %}"
                   "{{ m['reasoning_content'] }} "
                   "{% endif %}<|end|> {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    good = {"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "a story",
                                                                   "reasoning_content": "cake"}]}
    twice = {"messages": [{"role": "user", "content": "tell"}, {"role": "user", "content": "me"},
                          {"role": "assistant", "content": "a story"}]}
    opening = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "tell me"},
                            {"role": "assistant", "content": "a story"}]}

    def build_with(rows):
        module = InstructionDataModule(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), chat_template=alternating)
        module.tokenizer = make_tokenizer()
        module.setup("fit")
        return module

    module = build_with([good])
    assert "cake" in answer_tokens(module, module.datasets["train"][0])  # the reasoning reached the template
    with pytest.raises(ChatFormatError, match="Row 1: the chat template refused.*must alternate"):
        build_with([good, twice])
    with pytest.raises(ChatFormatError, match="Row 0: the conversation opens with an assistant turn"):
        build_with([opening])


def test_a_val_fraction_that_leaves_nothing_to_train_on_is_refused(tmp_path):
    with pytest.raises(ValueError, match="leaves none to train on"):
        build(tmp_path, [QA, QA], val_fraction=0.75)
