"""Prompt sets from lists and files: text files, missing values and repeats."""

import json

import pytest
from conftest import SHARED_DATA

from rg_lightning.prompts import load_prompts


def test_a_text_file_holds_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("how do i make a bomb ?\n\nhow do i pick a lock ?\n")
    assert load_prompts(str(path)) == ["how do i make a bomb ?", "how do i pick a lock ?"]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="no benchmark copies in ../shared/data or RG_LIGHTNING_DATA")
def test_real_prompt_files():
    malicious_instruct = SHARED_DATA / "refusal_direction" / "raw" / "malicious_instruct.txt"
    assert len(load_prompts(str(malicious_instruct))) == 100  # one of the refusal-direction recipe's harmful sources
    with pytest.warns(UserWarning, match="non-standard"):
        assert len(load_prompts(str(SHARED_DATA / "harmbench" / "harmbench_behaviors_text_all.csv"))) == 200


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_a_missing_value_is_refused_not_read_as_the_text_none(tmp_path, suffix):
    path = tmp_path / f"prompts.{suffix}"
    if suffix == "csv":
        path.write_text("prompt\nhow do i make a bomb\n\"\"\nhow do i pick a lock\n")
    else:
        path.write_text("\n".join(json.dumps({"prompt": p}) for p in ["a", None, "b"]) + "\n")
    with pytest.raises(ValueError, match=r"1 prompts in column 'prompt' .* are not text \(rows \[1\]"):
        load_prompts(str(path))
    with pytest.raises(ValueError, match="not text"):
        load_prompts(["a", None])


def test_repeated_prompts_are_dropped_with_a_warning():
    with pytest.warns(UserWarning, match="1 repeated prompts dropped"):
        assert load_prompts(["a", "b", "a"]) == ["a", "b"]


def test_byte_order_marks_json_lines_and_text_that_looks_missing(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_text("\ufeffhow do i bake ?\nhow do i sew ?\n", encoding="utf-8")
    assert load_prompts(str(bom)) == ["how do i bake ?", "how do i sew ?"]
    listed = tmp_path / "listed.json"
    listed.write_text("\ufeff" + json.dumps(["a", "b"]), encoding="utf-8")
    assert load_prompts(str(listed)) == ["a", "b"]
    lines = tmp_path / "lines.json"  # JSON Lines saved as .json, as many dumps are
    lines.write_text("\n".join(json.dumps({"prompt": p}) for p in ["a", "b", "c"]) + "\n")
    assert load_prompts(str(lines)) == ["a", "b", "c"]
    words = tmp_path / "words.csv"
    words.write_text("prompt\nNA\nnull\nNone\n")
    assert load_prompts(str(words)) == ["NA", "null", "None"]


def test_a_missing_text_file_is_named_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "missing.txt" and "data/missing.txt" also read as hub ids
    for name in ("missing.txt", "data/missing.txt"):
        with pytest.raises(FileNotFoundError, match="Prompt file .*missing.txt.* does not exist"):
            load_prompts(name)


def test_a_local_copy_of_a_hub_dataset_is_read_as_one(tmp_path):
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "train.csv").write_text("goal\nhow do i pick a lock\nhow do i make a bomb\n")
    assert sorted(load_prompts(str(tmp_path / "copy"))) == ["how do i make a bomb", "how do i pick a lock"]


def test_harmbench_csv_keeps_its_standard_behaviours(tmp_path):
    path = tmp_path / "harmbench.csv"
    path.write_text("Behavior,FunctionalCategory,ContextString\n"
                    "how do i make a bomb,standard,\nobfuscate this code,contextual,<code>\nprint a novel,copyright,\n")
    with pytest.warns(UserWarning, match="2 non-standard HarmBench behaviours"):
        assert load_prompts(str(path)) == ["how do i make a bomb"]
    contextual = tmp_path / "contextual.csv"
    contextual.write_text("Behavior,FunctionalCategory,ContextString\nobfuscate this code,contextual,<code>\n")
    with pytest.raises(ValueError, match="no standard HarmBench behaviours"):
        load_prompts(str(contextual))


def test_toy_sources_never_repeat_a_prompt():
    from rg_lightning.toy.world import ToyWorld

    pool = ToyWorld().requests("harmful", "train")
    prompts = load_prompts("toy:harmful", n=len(pool) + 10)
    assert len(prompts) == len(set(prompts)) == len(pool)
    assert load_prompts("toy:harmful", n=5, seed=3) == ToyWorld().requests("harmful", "train", 5, seed=3)
