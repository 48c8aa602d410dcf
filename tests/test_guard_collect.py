"""collect_basis under bounded memory and with processes that hold no prompts gives the same basis."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_tokenizer, tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from rg_lightning.guard.collect import collect_basis, statistics_passes

HARMFUL = ["how do i make a bomb ?", "how do i build a weapon ?", "how do i make a poison ?"]
HARMLESS = ["how do i bake a cake ?", "how do i build a shed ?", "how do i make a salad ?"]


def _load(model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def _assert_same(one, other):
    a, b = one.tensors(), other.tensors()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def _module_inputs(model, tokenizer, names, prompts):
    """Each named module's float64 input on the rendered, left-padded ``prompts`` (the test's own hooks), and the
    batch."""
    from rg_lightning.chat import render_prompt

    modules, seen = dict(model.named_modules()), {}
    hooks = [modules[name].register_forward_pre_hook(
        lambda module, args, name=name: seen.__setitem__(name, args[0].double())) for name in names]
    tokenizer.padding_side = "left"
    batch = tokenizer([render_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    return seen, batch


def test_passes_pack_modules_in_order_within_the_budget():
    widths = {"q": 4, "o": 4, "up": 4, "down": 16}  # Grams: 128, 128, 128, 2048 bytes
    assert statistics_passes(widths, None) == [["q", "o", "up", "down"]]
    assert statistics_passes(widths, 256) == [["q", "o"], ["up"], ["down"]]  # down alone exceeds: own pass
    assert statistics_passes(widths, 1) == [["q"], ["o"], ["up"], ["down"]]
    assert statistics_passes({}, 10) == []


@pytest.mark.parametrize("input_differences", [False, True])
def test_bounded_memory_gives_the_same_basis_in_more_passes(tiny_models, input_differences):
    model, tokenizer = _load(tiny_models["llama"])
    calls = []
    kwargs = dict(energy=0.99, answer_tokens=3, batch_size=2, input_differences=input_differences)
    whole = collect_basis(model, tokenizer, HARMFUL, HARMLESS, **kwargs)
    bounded = collect_basis(model, tokenizer, HARMFUL, HARMLESS, max_statistics_gb=1e-9,
                            progress=lambda kind, n: calls.append((kind, n)), **kwargs)
    assert whole.metadata["statistics_passes"] == 1
    n_passes = bounded.metadata["statistics_passes"]
    assert n_passes == len({id(b) for b in bounded.subspaces.values()}) > 1  # one shared-input group per pass
    _assert_same(whole, bounded)
    assert sum(n for kind, n in calls if kind == "statistics") == len(HARMFUL) * (n_passes - 1)
    with pytest.raises(ValueError, match="max_statistics_gb"):
        collect_basis(model, tokenizer, HARMFUL, HARMLESS, max_statistics_gb=0)


def test_ridge_adds_a_damped_tail_to_every_subspace(tiny_models):
    """ridge > 0: each subspace is the ridge-0 one plus orthogonal tail columns of norm < 1, usable as a basis."""
    from rg_lightning.guard import build_constraints

    model, tokenizer = _load(tiny_models["llama"])
    kwargs = dict(energy=0.9, answer_tokens=0, batch_size=3)
    hard = collect_basis(model, tokenizer, HARMFUL, HARMLESS, **kwargs)
    soft = collect_basis(model, tokenizer, HARMFUL, HARMLESS, ridge=0.01, **kwargs)
    assert soft.metadata["ridge"] == 0.01 and hard.metadata["ridge"] == 0.0
    for name, basis in soft.subspaces.items():
        k = hard.subspaces[name].shape[1]
        torch.testing.assert_close(basis[:, :k], hard.subspaces[name], rtol=1e-4, atol=1e-5, msg=name)
        norms = basis.square().sum(0)
        assert basis.shape[1] >= k and (norms[k:] < 1).all() and (norms[k:] >= 1e-3 * 0.99).all()
    assert any(b.shape[1] > hard.subspaces[n].shape[1] for n, b in soft.subspaces.items())
    build_constraints(model, soft.subspaces)  # accepted as weighted bases
    with pytest.raises(ValueError, match="ridge"):
        collect_basis(model, tokenizer, HARMFUL, HARMLESS, ridge=0.01, centered=True)


@pytest.mark.parametrize("options", [dict(ridge=0.01), dict(centered=True)], ids=["ridge", "centered"])
def test_input_differences_hold_each_modules_harmful_minus_harmless_mean_input(tiny_models, options):
    """Every subspace's unit columns span the module's mean input difference at each post-instruction position
    (the head's at the last one), measured here with hooks of the test's own on the bare prompts (the basis
    pass appends answers); without the option they do not."""
    from rg_lightning.guard import basis_weights
    from rg_lightning.guard.collect import post_instruction_length

    model, tokenizer = _load(tiny_models["llama"])
    kwargs = dict(energy=0.5, answer_tokens=2, batch_size=2, **options)
    held = collect_basis(model, tokenizer, HARMFUL, HARMLESS, input_differences=True, **kwargs)
    plain = collect_basis(model, tokenizer, HARMFUL, HARMLESS, **kwargs)
    assert held.metadata["input_differences"] and not plain.metadata["input_differences"]
    n_positions = post_instruction_length(tokenizer)

    def post_instruction_inputs(prompts):
        inputs, _ = _module_inputs(model, tokenizer, list(held.subspaces), prompts)
        return {name: x[:, -n_positions:] for name, x in inputs.items()}

    harmful, harmless = post_instruction_inputs(HARMFUL), post_instruction_inputs(HARMLESS)
    missed = 0.0
    for name, basis in held.subspaces.items():
        difference = (harmful[name].mean(0) - harmless[name].mean(0)).T  # [d, positions]
        if name == "lm_head":
            difference = difference[:, -1:]  # answer positions only (head_answer_only)
        unit = basis[:, basis_weights(basis) > 1 - 1e-4].double()
        outside = difference - unit @ (unit.T @ difference)
        assert (outside.norm(dim=0) <= 1e-2 * difference.norm(dim=0) + 1e-6).all(), name
        before = plain.subspaces[name][:, basis_weights(plain.subspaces[name]) > 1 - 1e-4].double()
        missed = max(missed, float((difference - before @ (before.T @ difference)).norm() / difference.norm()))
        if options.get("centered"):
            torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5, rtol=0)
    assert missed > 0.1  # the energy cutoff alone leaves part of the difference out
    head_columns = held.subspaces["lm_head"].shape[1] - plain.subspaces["lm_head"].shape[1]
    assert 0 <= head_columns <= 1  # at most the last position's difference


def _worker(rank, world_size, store, model_dir, out, options):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model, tokenizer = _load(model_dir)
        basis = collect_basis(model, tokenizer, HARMFUL[:2], HARMLESS[:2], energy=0.99, answer_tokens=2,
                              max_statistics_gb=1e-9, **options)
        out[rank] = {key: value.tolist() for key, value in basis.tensors().items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("options", [{"input_differences": True}, {"centered": True},
                                     {"row_energy": 0.5, "row_ridge": 0.3}],
                         ids=["input-differences", "centered", "row-weights"])
def test_a_process_without_prompts_adds_nothing(tmp_path, tiny_models, options):
    """Three processes, two prompts per set: the third process's shards are empty. Centred subspaces need the
    input sums reduced over processes too (each rank would centre with its own otherwise), and row weights the
    token counts of every rank's prompts."""
    out = mp.Manager().dict()
    mp.start_processes(_worker, args=(3, str(tmp_path / "store"), tiny_models["llama"], out, options), nprocs=3,
                       start_method="fork")
    model, tokenizer = _load(tiny_models["llama"])
    single = collect_basis(model, tokenizer, HARMFUL[:2], HARMLESS[:2], energy=0.99, answer_tokens=2,
                           **options).tensors()
    for rank in range(3):
        assert out[rank].keys() == single.keys()
        for key, value in single.items():
            torch.testing.assert_close(torch.tensor(out[rank][key], dtype=value.dtype), value, rtol=1e-5,
                                       atol=1e-6, msg=f"rank {rank} {key}")


def test_answers_end_at_the_models_turn_end_not_only_the_tokenizers_eos():
    """Gemma's tokenizer EOS is <eos> while a turn ends with <end_of_turn>: the protected answers stop at either."""
    from rg_lightning.chat import render_prompt
    from rg_lightning.guard.collect import _batches, with_greedy_answers
    from rg_lightning.toy import ALIGNED_MODEL_DIR, ToyWorld

    model, tokenizer = _load(ALIGNED_MODEL_DIR)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    model.generation_config.eos_token_id = end  # the turn's end ...
    tokenizer.eos_token = "<|system|>"  # ... is not the tokenizer's EOS
    world = ToyWorld()
    requests = world.requests("harmful", "heldout", 2) + world.requests("harmless", "heldout", 2)  # answers differ
    batch = next(_batches(tokenizer, [render_prompt(tokenizer, p) for p in requests], 4, "cpu"))
    answered = with_greedy_answers(model, tokenizer, batch, answer_tokens=24)
    width = batch["input_ids"].shape[1]
    new, mask = answered["input_ids"][:, width:].tolist(), answered["attention_mask"][:, width:].tolist()
    stops = [tokens.index(end) for tokens in new]  # every answer ends at the turn's end within 24 tokens ...
    assert max(stops) == len(new[0]) - 1 and min(stops) < max(stops)  # ... and generation stops there
    for stop, kept in zip(stops, mask):
        assert all(kept[:stop + 1]) and not any(kept[stop + 1:])  # the end token kept, nothing after it


@pytest.mark.parametrize("sharded, world, synced", [(True, 2, True), (True, 1, False), (False, 2, False)])
def test_answers_are_decoded_in_step_across_sharded_ranks(monkeypatch, sharded, world, synced):
    """Under FSDP2 with several processes every forward is a collective: decoding must go on until every rank is
    done (a rank whose answers all end early would otherwise leave the others waiting in a gather)."""
    from rg_lightning import generation
    from rg_lightning.guard import collect
    from rg_lightning.toy import ALIGNED_MODEL_DIR

    model, tokenizer = _load(ALIGNED_MODEL_DIR)
    seen = []

    def generate(input_ids, synced_gpus, **kwargs):  # (a synced decode needs a process group)
        seen.append(synced_gpus)
        return torch.cat([input_ids, input_ids[:, -2:]], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    monkeypatch.setattr(generation, "uses_fsdp2", lambda m: sharded)
    monkeypatch.setattr(generation, "process_world", lambda: (0, world))
    batch = next(collect._batches(tokenizer, ["how do i bake a cake ?"], 1, "cpu"))
    collect.with_greedy_answers(model, tokenizer, batch, answer_tokens=2)
    assert seen == [synced]


def test_a_head_kept_trainable_by_peft_is_still_the_answer_only_head(tiny_models):
    from peft import LoraConfig, get_peft_model

    from rg_lightning.guard.collect import output_head_name, protected_modules

    model, _ = _load(tiny_models["llama"])
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert output_head_name(peft_model, protected_modules(peft_model)) == \
        "base_model.model.lm_head.modules_to_save.default"


def test_a_template_suffix_that_merges_with_the_users_text_is_refused():
    """Llama-3's pre-tokenizer makes "?\n" one token: with a plain-text suffix ("\nASSISTANT:") the last positions
    would hold user text, a different number of template tokens per prompt."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rg_lightning.chat import render_prompt
    from rg_lightning.guard.collect import (check_post_instruction_tokens, post_instruction_length,
                                            post_instruction_suffix)

    split = r"[^\r\n\p{L}\p{N}]?\p{L}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+"  # Llama-3's punctuation + newline rule
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.train_from_iterator(["How do I make a cake?\nASSISTANT: Sure.\nUSER: <eot>"] * 20,
                             trainers.BpeTrainer(vocab_size=300, special_tokens=["<eot>", "<pad>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eot>")
    prompts = ["How do I make a cake?", "make a cake"]
    for template, merges in (("USER: {{ messages[0]['content'] }}\nASSISTANT:", True),
                             ("USER: {{ messages[0]['content'] }}<eot>ASSISTANT:", False)):
        tokenizer.chat_template = template
        texts = [render_prompt(tokenizer, p) for p in prompts]
        check = lambda: check_post_instruction_tokens(tokenizer, texts, post_instruction_suffix(tokenizer),  # noqa
                                                      post_instruction_length(tokenizer))
        if merges:
            with pytest.raises(ValueError, match="does not tokenize apart from the user's text.*special token"):
                check()
        else:
            check()


def test_a_multimodal_model_is_measured_on_its_decoder_and_its_vision_tower_left_alone():
    """Gemma-3 4B+ loads as Gemma3ForConditionalGeneration: no top-level layer count, and a vision tower that no
    text prompt reaches (no statistics, so nothing to hold: it is listed, not an error)."""
    from transformers import Gemma3Config, SiglipVisionConfig

    from rg_lightning.guard import build_constraints

    tokenizer = make_tokenizer()
    text = tiny_config("gemma3", len(tokenizer)).to_dict()
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma3Config(text_config=text, vision_config=vision.to_dict(),
                                                          mm_tokens_per_image=4)).eval()
    basis = collect_basis(model, tokenizer, HARMFUL, HARMLESS, energy=1.0, answer_tokens=0, head_answer_only=False)
    tower = [name for name in basis.metadata["modules_not_read"]]
    assert tower and all("vision_tower" in name or "multi_modal_projector" in name for name in tower)
    assert basis.harmful_means.shape[0] == 2 and set(basis.subspaces).isdisjoint(tower)
    basis.check_compatible(model)
    constraints = build_constraints(model, basis.subspaces, protected_token_ids=basis.protected_token_ids)
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {name for name, _ in constraints.skipped} >= set(tower) & linears  # reported as "no basis given"
    held_whole = {c.name for c in constraints.constraints if c.kind == "param" and c.param.ndim == 2}
    assert held_whole == {"model.vision_tower.embeddings.position_embedding"}  # patch positions, not token ids
    # listed (no text prompt reads them): the tower, and the projector's raw weight, which no linear holds
    assert all(".vision_tower." in name or ".multi_modal_projector." in name for name in constraints.uncovered)
    from rg_lightning.callbacks import RepresentationProjection

    guard = RepresentationProjection()
    guard.constraints = constraints
    guard._check_uncovered(model, basis)  # no text prompt's logits depend on them: no reason to stop the run
    prompts = tokenizer([tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                       add_generation_prompt=True) for p in HARMFUL[:1]],
                        return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        before = model(**prompts).logits
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(5, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    constraints.project_grads_()
    optimizer.step()
    constraints.apply_()
    with torch.no_grad():
        assert torch.allclose(model(**prompts).logits, before, atol=1e-4)  # the decoder's protected outputs held



def test_fused_moe_experts_that_no_constraint_holds_stop_the_run():
    """transformers 5 stores Mixtral's experts as fused 3-D weights: no linear constraint holds them, and the
    protected prompts read them."""
    from transformers import MixtralConfig

    from rg_lightning.callbacks import RepresentationProjection
    from rg_lightning.guard import build_constraints

    tokenizer = make_tokenizer()
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    basis = collect_basis(model, tokenizer, HARMFUL, HARMLESS, energy=0.9, answer_tokens=0)
    guard = RepresentationProjection()
    guard.constraints = build_constraints(model, basis.subspaces, protected_token_ids=basis.protected_token_ids)
    assert any("experts" in name for name in guard.constraints.uncovered)
    with pytest.raises(ValueError, match="read have no constraint.*experts.*allow_unconstrained=True"):
        guard._check_uncovered(model, basis)
    assert all(p.grad is None for p in model.parameters())  # the check accumulated nothing


def test_a_rank_wider_than_a_modules_input_names_the_module():
    from rg_lightning.toy import load_aligned

    model, tokenizer = load_aligned()
    with pytest.raises(ValueError, match=r"q_proj \(input width 128\): k must be in \[1, 128\], got 200"):
        collect_basis(model, tokenizer, HARMFUL, HARMLESS, rank=200, answer_tokens=0)


def test_a_shared_expert_reading_flattened_tokens_is_measured_and_held():
    """Qwen2-MoE's shared expert reads the tokens as [batch·seq, d]: its inputs are matched to the mask row for row
    (they failed the mask-shape check), so its linears are held like any other."""
    from transformers import Qwen2MoeConfig

    from rg_lightning.guard import build_constraints

    tokenizer = make_tokenizer()
    config = Qwen2MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                            moe_intermediate_size=32, shared_expert_intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                            max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    basis = collect_basis(model, tokenizer, HARMFUL, HARMLESS, energy=1.0, answer_tokens=0)
    shared = [name for name in basis.subspaces if "shared_expert." in name]
    assert shared
    with_differences = collect_basis(model, tokenizer, HARMFUL, HARMLESS, energy=0.5, answer_tokens=0,
                                     input_differences=True)  # read row for row too (it mixed up features)
    plain = collect_basis(model, tokenizer, HARMFUL, HARMLESS, energy=0.5, answer_tokens=0)
    assert all(with_differences.subspaces[n].shape[1] >= plain.subspaces[n].shape[1] for n in shared)
    from rg_lightning.chat import render_prompt

    tokenizer.padding_side = "left"  # as the basis pass reads them
    prompts = tokenizer([render_prompt(tokenizer, p) for p in HARMFUL], return_tensors="pt", padding=True,
                        add_special_tokens=False)
    prompts["position_ids"] = (prompts["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    module = model.get_submodule(shared[0])
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    with torch.no_grad():
        model(**prompts)
    constraints = build_constraints(model, {name: basis.subspaces[name] for name in shared})
    with torch.no_grad():
        for name in shared:
            model.get_submodule(name).weight.add_(torch.randn_like(model.get_submodule(name).weight))
    constraints.apply_()
    inputs, before = seen[0]
    with torch.no_grad():
        torch.testing.assert_close(module(inputs)[prompts["attention_mask"].reshape(-1).bool()],
                                   before[prompts["attention_mask"].reshape(-1).bool()], atol=1e-4, rtol=0)
    handle.remove()


def test_the_answer_only_head_holds_only_answer_positions(tiny_models):
    """``head_answer_only``: the logit head's Gram counts the last prompt position and the answer tokens, at most
    1 + answer_tokens directions per harmful prompt; every position would give it more."""
    model, tokenizer = _load(tiny_models["llama"])
    widths = {only: collect_basis(model, tokenizer, HARMFUL, HARMLESS, energy=1.0, answer_tokens=2,
                                  head_answer_only=only).subspaces["lm_head"].shape[1] for only in (True, False)}
    assert widths[True] <= len(HARMFUL) * (1 + 2) < widths[False]


def test_request_weight_zero_holds_what_modules_read_where_the_model_decides(tiny_models):
    """``request_weight=0`` (energy 1, no tail): every module's subspace spans exactly its inputs at the
    post-instruction positions and on the answer tokens, measured with the test's own hooks, and leaves most of
    the request positions' inputs outside; weight 1 spans those too. Weights outside [0, 1] are refused."""
    from rg_lightning.guard.collect import post_instruction_length

    model, tokenizer = _load(tiny_models["llama"])
    kwargs = dict(energy=1.0, answer_tokens=0, batch_size=3)
    decisive = collect_basis(model, tokenizer, HARMFUL, HARMLESS, request_weight=0.0, **kwargs)
    everywhere = collect_basis(model, tokenizer, HARMFUL, HARMLESS, **kwargs)
    assert decisive.metadata["request_weight"] == 0.0 and everywhere.metadata["request_weight"] == 1.0
    n_positions = post_instruction_length(tokenizer)
    seen, batch = _module_inputs(model, tokenizer, [n for n in decisive.subspaces if n != "lm_head"], HARMFUL)
    request = batch["attention_mask"].bool().clone()
    request[:, -n_positions:] = False

    def outside(basis, rows):  # share of the rows' norm outside the basis's span
        basis = basis.double()
        return float(torch.linalg.norm(rows - rows @ basis @ basis.T) / torch.linalg.norm(rows))

    for name, inputs in seen.items():
        post = inputs[:, -n_positions:].reshape(-1, inputs.shape[-1])
        assert outside(decisive.subspaces[name], post) < 1e-5, name
        assert outside(everywhere.subspaces[name], inputs[request]) < 1e-5, name
        assert decisive.subspaces[name].shape[1] <= post.shape[0] < everywhere.subspaces[name].shape[1], name
    assert max(outside(decisive.subspaces[name], inputs[request]) for name, inputs in seen.items()) > 0.3
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="request_weight"):
            collect_basis(model, tokenizer, HARMFUL, HARMLESS, request_weight=bad, **kwargs)
    with pytest.raises(ValueError, match="request_weight"):
        collect_basis(model, tokenizer, HARMFUL, HARMLESS, request_weight=0.5, centered=True, **kwargs)


def test_a_suffix_that_tokenizes_into_another_count_inside_the_prompt_is_refused():
    """No token straddles the boundary, but the suffix takes 3 tokens inside the prompt where it should take 2."""
    from rg_lightning.guard.collect import check_post_instruction_tokens

    def offsets(texts, **kwargs):
        return {"offset_mapping": [[(0, 3), (3, 4), (4, 5), (5, 6)]]}

    with pytest.raises(ValueError, match="does not tokenize apart"):
        check_post_instruction_tokens(offsets, ["abcXYZ"], "XYZ", 2)
    check_post_instruction_tokens(offsets, ["abcXYZ"], "XYZ", 3)


def test_row_weights_follow_how_often_each_token_occurs_in_the_harmful_prompts(tiny_models):
    """``row_energy`` < 1: the weights are :func:`row_weights` of each protected token's count in the rendered
    harmful prompts (the test counts them itself); the default holds every row exactly and stores no weights."""
    from rg_lightning.chat import render_prompt
    from rg_lightning.guard.subspace import row_weights

    model, tokenizer = _load(tiny_models["llama"])
    plain = collect_basis(model, tokenizer, HARMFUL, HARMLESS, energy=0.9, answer_tokens=0)
    assert plain.protected_token_weights is None
    basis = collect_basis(model, tokenizer, HARMFUL, HARMLESS, energy=0.9, answer_tokens=0, row_energy=0.5,
                          row_ridge=0.3)
    counts: dict[int, int] = {}
    for prompt in HARMFUL:
        for token in tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]:
            counts[token] = counts.get(token, 0) + 1
    assert basis.protected_token_ids.tolist() == sorted(counts) == plain.protected_token_ids.tolist()
    expected = row_weights(torch.tensor([counts[t] for t in sorted(counts)], dtype=torch.float64), 0.5, 0.3)
    torch.testing.assert_close(basis.protected_token_weights, expected.float())
    assert 0 < basis.metadata["rows_exact"] < len(counts) and basis.metadata["row_energy"] == 0.5
    frequent = max(counts, key=counts.get)
    assert basis.protected_token_weights[sorted(counts).index(frequent)] == 1.0
    # the weights' fingerprint reads exact rows only: damped ones move in a guarded fit, which may resume with it
    exact = set(basis.protected_token_ids[basis.protected_token_weights == 1].tolist())
    assert set(basis.embedding_probe_ids.tolist()) <= exact
    assert not set(plain.embedding_probe_ids.tolist()) <= exact  # the first ids, as before, include damped rows
    with pytest.raises(ValueError, match="row_energy must be in"):
        collect_basis(model, tokenizer, HARMFUL, HARMLESS, row_energy=0.0)
