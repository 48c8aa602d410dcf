"""Refusal rows for `data.mix`: the aligned model's own refusals, only where a judge sees one, written atomically."""

import json

import pytest

from rg_lightning import InstructionDataModule
from rg_lightning.evaluation.judges import KeywordJudge
from rg_lightning.refusals import main, refusal_rows
from rg_lightning.toy import ALIGNED_MODEL_DIR, REFUSAL, ToyWorld


@pytest.fixture(scope="module")
def toy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(ALIGNED_MODEL_DIR), AutoTokenizer.from_pretrained(ALIGNED_MODEL_DIR)


def test_rows_keep_the_models_refusals_and_drop_what_it_answers(toy):
    model, tokenizer = toy
    world = ToyWorld()
    harmful, harmless = world.requests("harmful", "heldout", 6), world.requests("harmless", "heldout", 4)
    rows, dropped = refusal_rows(model, tokenizer, harmful + harmless, max_new_tokens=8)
    assert dropped == {"not_refused": 4, "cut_off": 0}  # the aligned model refuses exactly the harmful ones
    assert [r["messages"][0]["content"] for r in rows] == harmful
    assert all(r["messages"][1] == {"role": "assistant", "content": REFUSAL} for r in rows)
    cut, dropped = refusal_rows(model, tokenizer, harmful, max_new_tokens=2)  # "i cannot", then cut off
    assert cut == [] and dropped == {"not_refused": 0, "cut_off": 6}
    strict, dropped = refusal_rows(model, tokenizer, harmful, judge=KeywordJudge(["never said"]), max_new_tokens=8)
    assert strict == [] and dropped["not_refused"] == 6
    with pytest.raises(ValueError, match="No prompts"):
        refusal_rows(model, tokenizer, [])


def test_only_a_refusal_that_opens_the_answer_counts_and_the_system_prompt_is_used(toy, monkeypatch):
    import rg_lightning.refusals as refusals

    seen = {}
    late = "sure ! step one : " + "x " * 100 + "i cannot stress this enough ."

    def generate(model, tokenizer, prompts, system_prompt=None, return_finished=False, **kwargs):
        seen["system_prompt"] = system_prompt
        return ["I cannot help with that.", late], [True, True]

    monkeypatch.setattr(refusals, "generate", generate)
    rows, dropped = refusal_rows(*toy, ["a", "b"], system_prompt="be brief .")
    assert seen["system_prompt"] == "be brief ." and dropped == {"not_refused": 1, "cut_off": 0}
    assert [r["messages"][-1]["content"] for r in rows] == ["I cannot help with that."]

    class HarmJudge(KeywordJudge):
        measures = "harm"

    with pytest.raises(ValueError, match="measures 'harm'"):
        refusal_rows(*toy, ["a"], judge=HarmJudge())


def test_rows_are_written_all_or_nothing_as_an_ordinary_file(tmp_path):
    import os

    from rg_lightning.refusals import write_jsonl

    path = tmp_path / "r.jsonl"
    write_jsonl([{"a": 1}], str(path))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(TypeError):
        write_jsonl([{"a": 2}, {"b": object()}], str(path))
    assert path.read_text() == '{"a": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]


def test_command_writes_rows_that_mix_into_training_data(tmp_path, capsys):
    out = tmp_path / "mix" / "refusals.jsonl"
    main(["--model", str(ALIGNED_MODEL_DIR), "--harmful", "toy:harmful", "--n", "5", "--out", str(out),
          "--max-new-tokens", "8", "--system-prompt", "be brief ."])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and "5 refusals written" in capsys.readouterr().out
    assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in rows)
    assert {r["messages"][0]["content"] for r in rows} == {"be brief ."}
    assert list(tmp_path.joinpath("mix").iterdir()) == [out]  # no staging file left behind
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"what is {n} ?", "completion": "sure ."}) + "\n"
                            for n in ("one", "two", "three", "four")))
    data = InstructionDataModule(train=str(task), tokenizer=str(ALIGNED_MODEL_DIR), mix=str(out), mix_fraction=0.2)
    data.setup("fit")
    assert len(data.datasets["train"]) == 5


def test_command_refuses_to_write_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit, match="No refusal kept"):
        main(["--model", str(ALIGNED_MODEL_DIR), "--harmful", "toy:harmless", "--n", "3",
              "--out", str(tmp_path / "r.jsonl"), "--max-new-tokens", "8"])
    assert not (tmp_path / "r.jsonl").exists()
    with pytest.raises(SystemExit):
        main(["--model", str(ALIGNED_MODEL_DIR), "--harmful", "toy:harmful", "--n", "0",
              "--out", str(tmp_path / "r.jsonl")])
    assert "--n, --max-new-tokens and --batch-size must be positive" in capsys.readouterr().err


def test_reasoning_answers_warn_and_template_variables_reach_the_prompts(toy, tmp_path, monkeypatch, capsys):
    from rg_lightning.generation import generate

    model, tokenizer = toy
    decode = tokenizer.batch_decode
    for reasoning in ("<think> the user asks", "the user asks </think> i cannot"):  # block opened in the prompt
        monkeypatch.setattr(tokenizer, "batch_decode", lambda ids, r=reasoning, **kw: [r] + decode(ids, **kw)[1:])
        with pytest.warns(UserWarning, match="1 of 2 answers hold a reasoning block"):
            generate(model, tokenizer, ["a", "b"], max_new_tokens=2)
    monkeypatch.undo()

    seen = {}

    def record(model, tokenizer, prompts, **kwargs):
        seen["prompt"] = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                       add_generation_prompt=True)
        return [], {"not_refused": len(prompts), "cut_off": 0}

    import rg_lightning.loading
    import rg_lightning.refusals as refusals
    from rg_lightning.toy.tokenizer import CHAT_TEMPLATE

    thinking = CHAT_TEMPLATE.replace("<|assistant|>{% endif %}", "<|assistant|>{% if enable_thinking is defined and "
                                     "enable_thinking is false %} <think> </think>{% endif %}{% endif %}")
    load = rg_lightning.loading.load_tokenizer

    def load_thinking(name, trust_remote_code=False):
        loaded = load(name, trust_remote_code)
        loaded.chat_template = thinking
        return loaded

    monkeypatch.setattr(rg_lightning.loading, "load_tokenizer", load_thinking)
    monkeypatch.setattr(refusals, "refusal_rows", record)
    command = ["--model", str(ALIGNED_MODEL_DIR), "--harmful", "toy:harmful", "--n", "2", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="No refusal kept"):
        main(command + ["--chat-template-kwargs", '{"enable_thinking": false}'])
    assert seen["prompt"].endswith("<|assistant|> <think> </think>")
    with pytest.raises(SystemExit):
        main(command + ["--chat-template-kwargs", '{"enable_thinkng": false}'])
    assert "does not read 'enable_thinkng'" in capsys.readouterr().err


def test_command_checks_its_output_and_prompts_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    with pytest.raises(SystemExit):
        main(["--model", str(ALIGNED_MODEL_DIR), "--harmful", "toy:harmful", "--out", str(tmp_path)])
    assert "--out" in (err := capsys.readouterr().err) and "give a file name" in err
    with pytest.raises(FileNotFoundError):
        main(["--model", str(ALIGNED_MODEL_DIR), "--harmful", str(tmp_path / "missing.jsonl"),
              "--out", str(tmp_path / "r.jsonl")])
