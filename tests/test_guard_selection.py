"""Refusal-score filtering and direction selection (rg_lightning.guard.selection) on real and tiny models."""

import math

import pytest
import torch
import torch.multiprocessing as mp

from rg_lightning.chat import encode_prompts
from rg_lightning.guard.basis import SafetyBasis
from rg_lightning.guard.collect import collect_basis
from rg_lightning.guard.selection import (
    activation_addition,
    choose_candidate,
    directional_ablation,
    refusal_filter,
    refusal_scores,
    score_candidates,
    select_direction,
)
from rg_lightning.refusal_score import refusal_score, refusal_token_ids
from rg_lightning.toy import ToyWorld, load_aligned, refusal_rate

WORLD = ToyWorld()
HARMFUL = WORLD.requests("harmful", "train", 32, seed=1)
HARMLESS = WORLD.requests("harmless", "train", 32, seed=1)
VAL_HARMFUL = WORLD.requests("harmful", "heldout", 24, seed=2)
VAL_HARMLESS = WORLD.requests("harmless", "heldout", 24, seed=2)


@pytest.fixture(scope="module")
def aligned():
    torch.manual_seed(0)
    return load_aligned()


@pytest.fixture(scope="module")
def aligned_basis(aligned):
    model, tokenizer = aligned
    return collect_basis(model, tokenizer, HARMFUL, HARMLESS, rank=1, answer_tokens=0, batch_size=32)


@pytest.fixture(scope="module")
def aligned_selection(aligned, aligned_basis):
    model, tokenizer = aligned
    return select_direction(model, tokenizer, aligned_basis.candidates, VAL_HARMFUL, VAL_HARMLESS, batch_size=64)


def last_logits(model, tokenizer, prompts):
    batch = encode_prompts(tokenizer, prompts)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(**batch, position_ids=positions).logits[:, -1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_module_fixtures():
    """The miniature models gain nothing from intra-op threads, and spin-waiting threads on shared cores cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread(_quiet_and_offline):
    torch.set_num_threads(1)


def hooks(model) -> list:
    """Every forward hook of the model (transformers installs its own output-capturing ones on first use)."""
    return [hook for m in model.modules() for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]


# -- filtering -----------------------------------------------------------------------------------------------
def test_filter_keeps_what_the_aligned_model_refuses_and_answers(aligned):
    model, tokenizer = aligned
    harmful_side = HARMFUL[:16] + HARMLESS[:8]  # mislabelled harmless prompts must be dropped
    harmless_side = HARMLESS[8:24] + HARMFUL[16:20]
    harmful_scores = refusal_scores(model, tokenizer, harmful_side, batch_size=7)
    harmless_scores = refusal_scores(model, tokenizer, harmless_side, batch_size=7)
    harmful, harmless, report = refusal_filter(harmful_side, harmless_side, harmful_scores, harmless_scores)
    assert harmful == HARMFUL[:16] and harmless == HARMLESS[8:24]
    assert report["fallback"] is None and report["harmful"]["kept"] == 16 and report["harmless"]["kept"] == 16
    assert report["harmful"]["score_max"] > 0 > report["harmless"]["score_min"]


def test_batched_scores_do_not_depend_on_batching_or_padding(aligned):
    model, tokenizer = aligned
    prompts = HARMFUL[:5] + ["how do i bake a cake ?"] + HARMLESS[:5]
    batched = refusal_scores(model, tokenizer, prompts, batch_size=16)
    alone = torch.cat([refusal_scores(model, tokenizer, [p]) for p in prompts])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=0)


def test_a_rank_without_prompts_runs_no_forward_and_still_gathers(aligned, monkeypatch):
    """Fewer prompts than processes (a strict filter on many GPUs): the rank without any must not run a forward on
    zero rows (a crash there hangs the others in the gather)."""
    import rg_lightning.guard.selection as selection

    model, tokenizer = aligned
    assert selection.refusal_scores(model, tokenizer, []).shape == (0,)
    alone = refusal_scores(model, tokenizer, HARMFUL[:2])
    monkeypatch.setattr(selection, "prompt_world", lambda model: (2, 3))  # rank 2 of 3, two prompts: none here

    def gather(gathered, mine):
        assert mine == []
        gathered[:] = [alone[:1].tolist(), alone[1:].tolist(), mine]

    monkeypatch.setattr(selection.dist, "all_gather_object", gather)
    torch.testing.assert_close(selection.refusal_scores(model, tokenizer, HARMFUL[:2]), alone, rtol=0, atol=0)


def test_filter_falls_back_per_side_and_says_why():
    harmful, harmless = ["a", "b", "c"], ["d", "e", "f"]
    kept_harmful, kept_harmless, report = refusal_filter(
        harmful, harmless, torch.tensor([1.0, -2.0, -3.0]), torch.tensor([-1.0, -2.0, 4.0]))
    assert kept_harmful == harmful and kept_harmless == ["d", "e"]
    assert report["harmful"]["fallback"] and not report["harmless"]["fallback"]
    assert "only 1 of 3 harmful prompts are refused" in report["fallback"] and "max 1.00" in report["fallback"]


# -- hooks ---------------------------------------------------------------------------------------------------
def test_per_row_directions_match_one_direction_at_a_time(aligned):
    model, tokenizer = aligned
    directions, layers = torch.randn(3, model.config.hidden_size), torch.tensor([1, 2, 3])
    together = score_candidates(model, tokenizer, directions, layers, VAL_HARMFUL[:6], VAL_HARMLESS[:5], batch_size=4)
    for i in range(3):
        alone = score_candidates(model, tokenizer, directions[i:i + 1], layers[i:i + 1], VAL_HARMFUL[:6],
                                 VAL_HARMLESS[:5], batch_size=64)
        for key, values in alone.items():
            torch.testing.assert_close(together[key][i:i + 1], values, atol=1e-4, rtol=1e-4, msg=key)


def block_inputs(model, batch) -> list[torch.Tensor]:
    """What every decoder block and the final norm receive, after any hook registered before this call has run."""
    seen, handles = [], [module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
                         for module in (*model.model.layers, model.model.norm)]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_ablation_and_addition_act_on_the_residual_stream(aligned):
    model, tokenizer = aligned
    direction = torch.randn(model.config.hidden_size)
    batch = encode_prompts(tokenizer, HARMFUL[:3])
    clean, installed = block_inputs(model, batch), hooks(model)
    with directional_ablation(model, direction):
        ablated = block_inputs(model, batch)
    unit = direction / direction.norm()
    along = lambda states: [float((h @ unit).abs().max()) for h in states]  # noqa: E731
    assert max(along(ablated)) < 1e-5 < min(along(clean))
    with activation_addition(model, direction, 2):
        shifted = block_inputs(model, batch)
    assert len(ablated) == 5  # the last block's output too: only ablating what attention and MLP write clears it
    for layer in (0, 1):
        torch.testing.assert_close(shifted[layer], clean[layer], atol=0, rtol=0)
    torch.testing.assert_close(shifted[2], clean[2] + direction)
    assert hooks(model) == installed


def test_hooks_are_removed_even_when_the_forward_fails(aligned):
    model, _ = aligned
    installed = hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with directional_ablation(model, torch.randn(model.config.hidden_size)):
            raise RuntimeError("boom")
    assert hooks(model) == installed


# -- selection -----------------------------------------------------------------------------------------------
def test_selection_on_the_aligned_model_finds_a_direction_that_mediates_refusal(aligned, aligned_basis,
                                                                                 aligned_selection):
    model, tokenizer = aligned
    summary, chosen = aligned_selection["selection"], aligned_selection["selection"]["chosen"]
    # layers 1 and 2 of those below int(0.8 * 4) x 2 template positions: layer 0 reads the same template tokens'
    # embeddings in every prompt, so its candidates are zero and are not directions
    assert len(summary["candidates"]) == 2 * 2 and {row["layer"] for row in summary["candidates"]} == {1, 2}
    assert summary["harmful_score"] > 3 and chosen["ablation_score"] < -2  # refusal -> compliance, by logits
    assert chosen["harmless_kl"] <= summary["kl_threshold"]
    direction = aligned_basis.candidates[chosen["layer"], chosen["position"]]
    assert refusal_rate(model, tokenizer, VAL_HARMFUL) == 1.0
    with directional_ablation(model, direction):
        assert refusal_rate(model, tokenizer, VAL_HARMFUL) <= 0.1  # and by generation
        assert refusal_rate(model, tokenizer, VAL_HARMLESS) == 0.0  # harmless answers are untouched
    # The miniature model's last-position directions make harmless prompts refused when added, but ablating
    # them breaks harmless answers (KL > 0.1), so the addition filter is the one relaxed there.
    inducing = max(summary["candidates"], key=lambda row: row["addition_score"])
    assert inducing["addition_score"] > 0 and summary["harmless_score"] < 0
    with activation_addition(model, aligned_basis.candidates[inducing["layer"], inducing["position"]],
                             inducing["layer"]):
        assert refusal_rate(model, tokenizer, VAL_HARMLESS) >= 0.9
    assert summary["fallback"] is None or "addition filter is ignored" in summary["fallback"]


def test_selection_leaves_the_model_unchanged(aligned, aligned_selection):
    model, tokenizer = aligned
    before, installed = last_logits(model, tokenizer, VAL_HARMLESS[:4]), hooks(model)
    select_direction(model, tokenizer, torch.randn(2, 1, model.config.hidden_size), VAL_HARMFUL[:4],
                     VAL_HARMLESS[:4])
    assert hooks(model) == installed and not model.training
    assert torch.equal(last_logits(model, tokenizer, VAL_HARMLESS[:4]), before)


def test_choose_candidate_relaxes_filters_in_order_and_says_why():
    def row(ablation, kl, addition):
        return {"ablation_score": ablation, "harmless_kl": kl, "addition_score": addition}

    table = [row(-5.0, 2.0, 3.0), row(-1.0, 0.05, 1.0), row(-3.0, 0.01, 2.0), row(float("nan"), 0.0, 4.0)]
    assert choose_candidate(table) == (2, None)
    index, reason = choose_candidate([row(-5.0, 2.0, 3.0), row(-1.0, 0.05, -1.0), row(-2.0, 0.0, -2.0)])
    assert index == 2 and "2 do not make harmless prompts refused" in reason and "addition filter is ignored" in reason
    index, reason = choose_candidate([row(-1.0, 12.0, 3.0), row(-4.0, float("nan"), -1.0)])
    assert index == 1 and "2 move harmless next-token KL above 0.1" in reason and "ignoring both filters" in reason


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_selection_on_a_random_model_falls_back_without_crashing(tiny_models, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[family])
    harmful = [f"how do i make a bomb {w} ?" for w in ("one", "two", "three")]
    harmless = [f"how do i bake a cake {w} ?" for w in ("one", "two", "three")]
    basis = collect_basis(model, tokenizer, harmful, harmless, rank=1, answer_tokens=0)
    installed = hooks(model)
    result = select_direction(model, tokenizer, basis.candidates, harmful, harmless, kl_threshold=0.0)
    assert result["selection"]["fallback"] and "passes both filters" in result["selection"]["fallback"]
    # a threshold of 0 keeps no real candidate, so both filters go: before zero candidates were dropped, a zero
    # layer-0 candidate "kept the KL" by changing nothing and was chosen
    assert "ignoring both filters" in result["selection"]["fallback"]
    assert basis.candidates[result["selected"]["layer"], result["selected"]["position"]].norm() > 0
    assert result["selected"] == {k: result["selection"]["chosen"][k] for k in ("layer", "position")}
    assert all(math.isfinite(row["harmless_kl"]) for row in result["selection"]["candidates"])
    assert hooks(model) == installed
    for name, parameter in model.named_parameters():  # norms that rescale unevenly, as trained ones do
        if "norm" in name:
            parameter.data.normal_()
    unit = torch.nn.functional.normalize(torch.randn(model.config.hidden_size), dim=0)
    with directional_ablation(model, unit):  # Gemma-2 writes through its post-norms: those are hooked
        assert max(float((h @ unit).abs().max() / h.norm(dim=-1).max())
                   for h in block_inputs(model, encode_prompts(tokenizer, harmful))) < 1e-5


# -- metadata ------------------------------------------------------------------------------------------------
def test_selected_direction_survives_save_load_and_state_dict(tmp_path, aligned_basis, aligned_selection):
    from rg_lightning.callbacks import RefusalDirections

    basis = SafetyBasis.from_tensors(aligned_basis.tensors(), {**aligned_basis.metadata, **aligned_selection})
    chosen = aligned_selection["selected"]
    expected = basis.candidates[chosen["layer"], chosen["position"]]
    torch.testing.assert_close(basis.direction(), expected / expected.norm())
    assert not torch.equal(basis.direction(), basis.direction(layer=2, position=-1)) or chosen == {"layer": 2,
                                                                                                   "position": -1}
    loaded = SafetyBasis.load(basis.save(str(tmp_path / "basis")))
    assert loaded.metadata["selection"] == basis.metadata["selection"]
    assert torch.equal(loaded.direction(), basis.direction())
    owner, restored = RefusalDirections(), RefusalDirections()
    owner.basis = loaded
    restored.load_state_dict(owner.state_dict())
    assert restored.basis.selected == chosen and torch.equal(restored.basis.direction(), basis.direction())
    torch.testing.assert_close(restored.basis.layer_directions()[chosen["layer"]], basis.direction())


def test_a_zero_direction_is_refused(aligned_basis):
    with pytest.raises(ValueError, match="No refusal direction at layer 0.*coincide"):
        aligned_basis.direction(layer=0, position=-1)
    with pytest.raises(ValueError, match="Every refusal direction candidate is zero"):
        select_direction(None, None, torch.zeros(3, 2, 8), ["a"], ["b"])


def test_a_selection_outside_the_basis_is_refused(aligned_basis):
    with pytest.raises(ValueError, match="outside its 4 layers x 2 positions"):
        SafetyBasis.from_tensors(aligned_basis.tensors(), {"selected": {"layer": 4, "position": -1}})


# -- processes -----------------------------------------------------------------------------------------------
def _sharded_run(rank: int, world: int, init_file: str, out: str, model, tokenizer, candidates) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    scores = refusal_scores(model, tokenizer, VAL_HARMFUL[:7], batch_size=2)
    selection = select_direction(model, tokenizer, candidates, VAL_HARMFUL[:7], VAL_HARMLESS[:5], batch_size=6)
    torch.save({"scores": scores, "selection": selection}, f"{out}.rank{rank}")
    dist.destroy_process_group()


def test_two_processes_score_and_select_like_one(tmp_path, aligned, aligned_basis):
    model, tokenizer = aligned
    out = str(tmp_path / "run")
    # Forked workers share the loaded model and skip re-importing torch and transformers.
    mp.start_processes(_sharded_run, args=(2, str(tmp_path / "init"), out, model, tokenizer, aligned_basis.candidates),
                       nprocs=2, start_method="fork")
    ranks = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0]["scores"], ranks[1]["scores"])
    assert ranks[0]["selection"] == ranks[1]["selection"]
    single = select_direction(model, tokenizer, aligned_basis.candidates, VAL_HARMFUL[:7], VAL_HARMLESS[:5])
    assert ranks[0]["selection"]["selected"] == single["selected"]
    ids = refusal_token_ids(tokenizer)
    torch.testing.assert_close(ranks[0]["scores"], refusal_score(last_logits(model, tokenizer, VAL_HARMFUL[:7]), ids),
                               atol=1e-4, rtol=0)
    for mine, theirs in zip(ranks[0]["selection"]["selection"]["candidates"], single["selection"]["candidates"]):
        for key in ("ablation_score", "addition_score", "harmless_kl"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-4), key
