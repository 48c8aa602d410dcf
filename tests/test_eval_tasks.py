"""Utility tasks: real local copies give the published sizes and label balance, the hub path passes the right
id/config/split, the scoring rules hold on hand-written answers, and bad input says how to fix it."""

from __future__ import annotations

from collections import Counter

import pytest

from conftest import SHARED_DATA
from rg_lightning.evaluation.tasks import (
    TASKS,
    UtilityTask,
    last_number_matches,
    load_task,
    task_names,
)
from rg_lightning.toy.world import REFUSAL, ToyWorld


@pytest.fixture
def shared():
    if not SHARED_DATA.is_dir():
        pytest.skip("no benchmark copies in ../shared/data (next to the repository) or RG_LIGHTNING_DATA")
    return SHARED_DATA


def test_registry_names():
    assert set(TASKS) == {"gsm8k", "sst2", "agnews"}
    assert task_names() == ["gsm8k", "sst2", "agnews", "toy:benign", "toy:sentiment", "toy:arithmetic",
                            "toy:alt:benign", "toy:alt:sentiment", "toy:alt:arithmetic"]


def test_gsm8k_local_copy(shared):
    task = load_task("gsm8k", path=str(shared / "gsm8k/test.jsonl"))
    assert (len(task), task.metric, task.source) == (1319, "exact_match", str(shared / "gsm8k/test.jsonl"))
    assert task.references[0] == "18" and task.prompts[0].startswith("Janet’s ducks lay 16 eggs")
    assert "final answer as a number" in task.prompts[0]
    assert all(ref.lstrip("-").isdigit() for ref in task.references)  # "#### 1,000" lost its comma
    assert task.score("16 - 3 - 4 = 9 eggs, 9 * 2 = 18", "18")


def test_sst2_local_copy(shared):
    task = load_task("sst2", path=str(shared / "sst2/test.tsv"))
    assert (len(task), task.metric) == (872, "accuracy")
    assert Counter(task.references) == {"positive": 444, "negative": 428}
    assert "it 's a charming and often affecting journey ." in task.prompts[0]
    assert task.references[:2] == ["positive", "negative"]


def test_agnews_local_copy_shifts_labels_one_to_four(shared):
    task = load_task("agnews", path=str(shared / "agnews/test.csv"))
    assert len(task) == 7600
    assert Counter(task.references) == {"World": 1900, "Sports": 1900, "Business": 1900, "Sci/Tech": 1900}
    assert task.references[:2] == ["Business", "Sci/Tech"]  # the file's first labels are 3 and 4
    assert "Fears for T N pension after talks Unions representing workers" in task.prompts[0]


@pytest.mark.parametrize("name, call, row, reference", [
    ("gsm8k", ("openai/gsm8k", "main", "test"), {"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}, "2"),
    ("sst2", ("stanfordnlp/sst2", None, "validation"), {"idx": 0, "sentence": "fine film ", "label": 1}, "positive"),
    ("agnews", ("fancyzhx/ag_news", None, "test"), {"text": "Stocks fell.", "label": 0}, "World"),
])
def test_hub_default_passes_id_config_split(monkeypatch, name, call, row, reference):
    datasets = pytest.importorskip("datasets")  # imported here: a GPU-only check collects this file without it
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([row])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_task(name)
    assert calls == [call]
    assert task.references == [reference]
    assert task.source == f"{call[0]}{':' + call[1] if call[1] else ''}@{call[2]}"


@pytest.mark.parametrize("response, reference, correct", [
    ("The answer is 1,000.", "1000", True),
    ("So she makes $18.00 every day.", "18", True),
    ("42.", "42", True),
    ("It is 17, no wait, 18", "18", True),
    ("It is 18, no wait, 17", "18", False),
    ("She is -5 dollars short", "-5", True),
    ("5-3 = 2 left", "2", True),
    ("1,234,567 people", "1234567", True),
    ("3.5 hours", "3", False),
    ("no number here", "7", False),
    ("", "7", False),
])
def test_last_number_rule(response, reference, correct):
    assert last_number_matches(response, reference) is correct


@pytest.fixture
def classifiers(monkeypatch):
    """Scoring rules of the registered classification tasks, without reading any data."""
    datasets = pytest.importorskip("datasets")
    row = {"sentence": "s", "text": "t", "label": 0}
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: datasets.Dataset.from_list([row]))
    return load_task("sst2").score, load_task("agnews").score


@pytest.mark.parametrize("response, reference, correct", [
    ("Positive.", "positive", True),
    ("negative", "negative", True),
    ("The sentiment is NEGATIVE", "negative", True),
    ("It is not positive; it is negative.", "negative", False),  # the first label word decides
    ("positively glowing", "positive", False),  # whole words only
    ("I cannot help with that.", "positive", False),
    ("", "negative", False),
])
def test_sst2_rule(classifiers, response, reference, correct):
    assert classifiers[0](response, reference) is correct


@pytest.mark.parametrize("response, reference, correct", [
    ("Sci/Tech", "Sci/Tech", True),
    ("science and technology", "Sci/Tech", True),
    ("Category: Sports.", "Sports", True),
    ("Business news about world markets", "Business", True),
    ("World", "Business", False),
    ("Entertainment", "World", False),
])
def test_agnews_rule(classifiers, response, reference, correct):
    assert classifiers[1](response, reference) is correct


@pytest.mark.parametrize("name, variant, task", [
    ("toy:benign", "default", "benign"), ("toy:sentiment", "default", "sentiment"),
    ("toy:arithmetic", "default", "arithmetic"), ("toy:alt:benign", "alt", "benign"),
])
def test_toy_tasks_score_as_the_world_does(name, variant, task):
    loaded = load_task(name, limit=12, seed=2)
    world = ToyWorld(variant)
    examples = world.task_examples(task, "heldout", 12, seed=2)
    assert loaded.prompts == [e["messages"][0]["content"] for e in examples]
    assert loaded.references == [e["messages"][1]["content"] for e in examples]
    assert len(load_task(name)) == 200
    responses = [ref + " extra words" if i % 3 == 0 else REFUSAL if i % 3 == 1 else "wrong"
                 for i, ref in enumerate(loaded.references)]
    verdicts = loaded.scores(responses)
    assert sum(verdicts) / len(verdicts) == world.score_task(task, loaded.prompts, responses, loaded.references)
    assert verdicts[0] and not verdicts[2]
    assert loaded.max_new_tokens == max(len(r.split()) for r in loaded.references) + 2


def test_limit_is_deterministic_and_in_file_order(shared):
    path = str(shared / "sst2/test.tsv")
    full = load_task("sst2", path=path).prompts
    first = load_task("sst2", path=path, limit=25, seed=1)
    assert first.prompts == load_task("sst2", path=path, limit=25, seed=1).prompts
    assert first.prompts != load_task("sst2", path=path, limit=25, seed=2).prompts
    positions = [full.index(p) for p in first.prompts]
    assert positions == sorted(positions) and len(positions) == 25


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"q": "capital of France?", "a": "Paris", "topic": "geo"}\n'
                    '{"q": "2 + 2?", "a": "4", "topic": "math"}\n')
    return str(path)


@pytest.mark.parametrize("score, response, correct", [
    ("exact", " Paris \n", True),
    ("exact", "It is Paris", False),
    ("contains", "It is paris.", True),
    ("last_number", "it is 4", False),  # "Paris" has no number
    ("operator:eq", "Paris", True),
    (lambda response, reference: response.startswith(reference[0]), "Pizza", True),
])
def test_custom_task_scores(qa_file, score, response, correct):
    task = UtilityTask.from_source("qa", qa_file, "q", "a", score=score)
    assert (task.prompts, task.references, task.source) == (["capital of France?", "2 + 2?"], ["Paris", "4"], qa_file)
    assert task.score(response, "Paris") is correct


def test_custom_task_template_uses_prompt_and_columns(qa_file):
    task = UtilityTask.from_source("qa", qa_file, "q", "a", template="[{topic}] {prompt} Answer briefly.",
                                   metric="accuracy", max_new_tokens=4)
    assert task.prompts == ["[geo] capital of France? Answer briefly.", "[math] 2 + 2? Answer briefly."]
    assert (task.metric, task.max_new_tokens) == ("accuracy", 4)


def test_custom_task_errors(qa_file):
    with pytest.raises(ValueError, match="Unknown score 'fuzzy'.*'module:function'"):
        UtilityTask.from_source("qa", qa_file, "q", "a", score="fuzzy")
    with pytest.raises(ValueError, match="Cannot import score 'no_such_module:f'"):
        UtilityTask.from_source("qa", qa_file, "q", "a", score="no_such_module:f")
    with pytest.raises(ValueError, match=r"column 'question' is not in .*\['q', 'a', 'topic'\]"):
        UtilityTask.from_source("qa", qa_file, "question", "a")
    with pytest.raises(ValueError, match="template field 'level' is neither 'prompt' nor a column"):
        UtilityTask.from_source("qa", qa_file, "q", "a", template="{level}: {prompt}")
    with pytest.raises(ValueError, match="metric must be one of"):
        UtilityTask.from_source("qa", qa_file, "q", "a", metric="f1")
    task = UtilityTask.from_source("qa", qa_file, "q", "a")
    with pytest.raises(ValueError, match="1 responses for 2 prompts"):
        task.scores(["Paris"])


def test_load_task_errors(tmp_path, qa_file):
    with pytest.raises(ValueError, match="Unknown task 'gsm9k'.*gsm8k, sst2, agnews.*from_source"):
        load_task("gsm9k")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task("gsm8k", path=str(tmp_path / "absent.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no rows"):
        load_task("gsm8k", path=str(empty))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['sentence', 'label'\]; it has \['q', 'a', 'topic'\]"):
        load_task("sst2", path=qa_file)
    no_marker = tmp_path / "gsm.jsonl"
    no_marker.write_text('{"question": "1 + 1?", "answer": "2"}\n')
    with pytest.raises(ValueError, match="no '#### <number>' line"):
        load_task("gsm8k", path=str(no_marker))
    unlabelled = tmp_path / "sst2.tsv"
    unlabelled.write_text("sentence\tlabel\nfine film\t-1\n")
    with pytest.raises(ValueError, match="label -1 .* outside 0..1; unlabelled"):
        load_task("sst2", path=str(unlabelled))
    with pytest.raises(ValueError, match="leave path= out"):
        load_task("toy:arithmetic", path=qa_file)
    with pytest.raises(ValueError, match="limit must be"):
        load_task("toy:arithmetic", limit=0)
