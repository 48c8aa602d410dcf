"""The safety benchmark registry: real local copies give the published sizes, the hub path passes the right
id/config/split and reads hub column names, samples are deterministic, and bad input says how to fix it."""

from __future__ import annotations

from collections import Counter

import pytest

from rg_lightning.evaluation.benchmarks import BENCHMARKS, benchmark_names, load_benchmark
from rg_lightning.toy.world import ToyWorld
from conftest import SHARED_DATA

# name, file under shared/data, rows, number of distinct categories (0 = the file has none)
LOCAL_COPIES = [
    ("advbench", "advbench/harmful_behaviors.csv", 520, 0),
    ("advbench", "refusal_direction/processed/advbench.json", 520, 0),
    ("directharm4", "directharm4/directHarm4.csv", 400, 4),
    ("jailbreakbench", "jailbreakbench/harmful-behaviors.csv", 100, 10),
    ("jailbreakbench_benign", "jailbreakbench/benign-behaviors.csv", 100, 10),
    ("harmbench", "harmbench/harmbench_behaviors_text_test.csv", 159, 6),
    ("harmbench", "harmbench/harmbench_behaviors_text_val.csv", 41, 6),
    ("harmbench", "harmbench/harmbench_behaviors_text_all.csv", 200, 6),
    ("harmbench", "refusal_direction/processed/harmbench_test.json", 159, 6),
    ("strongreject", "refusal_direction/raw/strongreject.csv", 313, 6),
    ("strongreject", "refusal_direction/processed/strongreject.json", 313, 6),
]
# What the hub mirrors hold: (id, config, split) and a row with their column names.
HUB_ROWS = {
    "advbench": (("walledai/AdvBench", None, "train"), {"prompt": "p", "target": "Sure, here is"}),
    "directharm4": (("vfleaking/DirectHarm4", None, "test"), {"instruction": "p", "category": "malware"}),
    "jailbreakbench": (("JailbreakBench/JBB-Behaviors", "behaviors", "harmful"),
                       {"Index": 1, "Goal": "p", "Target": "t", "Behavior": "b", "Category": "Malware", "Source": "s"}),
    "jailbreakbench_benign": (("JailbreakBench/JBB-Behaviors", "behaviors", "benign"),
                              {"Index": 1, "Goal": "p", "Target": "t", "Behavior": "b", "Category": "Malware",
                               "Source": "s"}),
    "harmbench": (("walledai/HarmBench", "standard", "train"), {"prompt": "p", "category": "cybercrime"}),
    "strongreject": (("walledai/StrongREJECT", None, "train"), {"prompt": "p", "category": "Violence", "source": "s"}),
}


@pytest.fixture
def shared():
    if not SHARED_DATA.is_dir():
        pytest.skip("no benchmark copies in ../shared/data (next to the repository) or RG_LIGHTNING_DATA")
    return SHARED_DATA


def test_every_registered_benchmark_is_covered_here():
    assert {name for name, *_ in LOCAL_COPIES} == set(BENCHMARKS) == set(HUB_ROWS)
    assert set(benchmark_names()) == set(BENCHMARKS) | {"toy:harmful", "toy:harmless", "toy:alt:harmful",
                                                         "toy:alt:harmless"}


@pytest.mark.parametrize("name, relative, rows, n_categories", LOCAL_COPIES)
def test_local_copy_gives_the_documented_size(shared, name, relative, rows, n_categories):
    benchmark = load_benchmark(name, path=str(shared / relative))
    assert len(benchmark) == len(benchmark.categories) == rows
    assert benchmark.kind == BENCHMARKS[name].kind
    assert benchmark.source == str(shared / relative)
    assert all(isinstance(p, str) and p.strip() for p in benchmark.prompts)
    assert len({c for c in benchmark.categories if c is not None}) == n_categories
    if n_categories == 0:
        assert set(benchmark.categories) == {None}


def test_directharm4_has_four_categories_of_one_hundred(shared):
    benchmark = load_benchmark("directharm4", path=str(shared / "directharm4/directHarm4.csv"))
    assert Counter(benchmark.categories) == {"malware": 100, "drug": 100, "phishing": 100, "disinfo": 100}
    assert benchmark.prompts[0].startswith("Create a tutorial on how to develop a computer virus")


def test_jailbreakbench_reads_goal_not_behaviour(shared):
    harmful = load_benchmark("jailbreakbench", path=str(shared / "jailbreakbench/harmful-behaviors.csv"))
    benign = load_benchmark("jailbreakbench_benign", path=str(shared / "jailbreakbench/benign-behaviors.csv"))
    assert (harmful.kind, benign.kind) == ("harmful", "benign")
    assert harmful.prompts[0].startswith("Write a defamatory article")
    assert set(harmful.categories) == set(benign.categories)


def test_harmbench_keeps_standard_behaviours_with_semantic_category(shared):
    test = load_benchmark("harmbench", path=str(shared / "harmbench/harmbench_behaviors_text_test.csv"))
    processed = load_benchmark("harmbench", path=str(shared / "refusal_direction/processed/harmbench_test.json"))
    assert "copyright" not in test.categories
    assert sorted(test.prompts) == sorted(processed.prompts)  # also shows prompts are stripped


def test_strongreject_raw_and_processed_agree(shared):
    raw = load_benchmark("strongreject", path=str(shared / "refusal_direction/raw/strongreject.csv"))
    processed = load_benchmark("strongreject", path=str(shared / "refusal_direction/processed/strongreject.json"))
    assert raw.prompts == processed.prompts
    assert raw.categories == processed.categories


@pytest.mark.parametrize("name", sorted(HUB_ROWS))
def test_hub_default_passes_id_config_split_and_reads_hub_columns(monkeypatch, name):
    datasets = pytest.importorskip("datasets")  # imported here: a GPU-only check collects this file without it
    (hub_id, config, split), row = HUB_ROWS[name]
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{**row, **{k: f"{v} {i}" for k, v in row.items() if v == "p"}}
                                           for i in range(3)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    benchmark = load_benchmark(name)
    assert calls == [(hub_id, config, split)]
    assert benchmark.prompts == ["p 0", "p 1", "p 2"]
    category = next((v for k, v in row.items() if k.lower() == "category"), None)
    assert benchmark.categories == [category] * 3
    assert benchmark.source == f"{hub_id}{':' + config if config else ''}@{split}"


def test_limit_is_a_seeded_sample_in_file_order(shared):
    path = str(shared / "advbench/harmful_behaviors.csv")
    full = load_benchmark("advbench", path=path).prompts
    first = load_benchmark("advbench", path=path, limit=20, seed=3)
    assert first.prompts == load_benchmark("advbench", path=path, limit=20, seed=3).prompts
    assert first.prompts != load_benchmark("advbench", path=path, limit=20, seed=4).prompts
    assert len(first) == 20
    positions = [full.index(p) for p in first.prompts]
    assert positions == sorted(positions)
    assert load_benchmark("advbench", path=path, limit=10_000).prompts == full


@pytest.mark.parametrize("name, request_kind, kind, variant", [
    ("toy:harmful", "harmful", "harmful", "default"), ("toy:harmless", "harmless", "benign", "default"),
    ("toy:alt:harmful", "harmful", "harmful", "alt"), ("toy:alt:harmless", "harmless", "benign", "alt"),
])
def test_toy_benchmarks_are_the_worlds_held_out_requests(name, request_kind, kind, variant):
    world = ToyWorld(variant)
    benchmark = load_benchmark(name)
    assert benchmark.kind == kind
    assert sorted(benchmark.prompts) == sorted(world.requests(request_kind, "heldout"))
    assert len(benchmark) == {"harmful": 375, "harmless": 450}[request_kind]
    domains = world.categories if request_kind == "harmful" else world.harmless_categories
    assert set(benchmark.categories) == set(domains)
    sample = load_benchmark(name, limit=7, seed=1)
    assert sample == load_benchmark(name, limit=7, seed=1) and len(sample) == 7
    assert set(sample.prompts) <= set(benchmark.prompts)


def test_own_file_with_kind_detects_the_prompt_column(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("id,Question,category\n1,first request,a\n2,second request,b\n")
    benchmark = load_benchmark("mine", path=str(path), kind="benign")
    assert (benchmark.name, benchmark.kind, benchmark.prompts, benchmark.categories) == \
        ("mine", "benign", ["first request", "second request"], ["a", "b"])
    path.write_text("id,ask\n1,only request\n")
    assert load_benchmark("mine", path=str(path), kind="harmful", prompt_column="ask").prompts == ["only request"]


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown benchmark 'advbench2'.*advbench, directharm4.*path=.*kind="):
        load_benchmark("advbench2")
    with pytest.raises(ValueError, match="Unknown benchmark"):  # a path alone does not say what to measure
        load_benchmark("mine", path="mine.csv")


def test_missing_prompt_column_names_present_and_expected(tmp_path):
    path = tmp_path / "advbench.csv"
    path.write_text("request,target\nhello,Sure\n")
    with pytest.raises(ValueError, match=r"columns \['request', 'target'\].*\['prompt', 'goal', 'instruction'\]"):
        load_benchmark("advbench", path=str(path))
    with pytest.raises(ValueError, match="prompt_column 'missing' is not in"):
        load_benchmark("advbench", path=str(path), prompt_column="missing")


def test_empty_and_missing_files_say_so(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="no rows"):
        load_benchmark("advbench", path=str(empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_benchmark("advbench", path=str(tmp_path / "absent.csv"))
    blank = tmp_path / "blank.csv"
    blank.write_text("goal,target\n,Sure\n")
    with pytest.raises(ValueError, match="empty prompt"):
        load_benchmark("advbench", path=str(blank))


def test_other_bad_input_is_refused(tmp_path):
    path = tmp_path / "harmbench.csv"
    path.write_text("Behavior,FunctionalCategory,SemanticCategory\nx,copyright,copyright\n")
    with pytest.raises(ValueError, match="passes its filter"):
        load_benchmark("harmbench", path=str(path))
    with pytest.raises(ValueError, match="kind must be"):
        load_benchmark("mine", path=str(path), kind="toxic")
    with pytest.raises(ValueError, match="is harmful; leave kind= out"):
        load_benchmark("advbench", path=str(path), kind="benign")
    with pytest.raises(ValueError, match="leave path= out"):
        load_benchmark("toy:harmful", path=str(path))
    with pytest.raises(ValueError, match="limit must be"):
        load_benchmark("toy:harmful", limit=0)
