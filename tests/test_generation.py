"""Greedy generation is plain greedy, whatever logits processors a model's generation config ships."""

from transformers import AutoModelForCausalLM, AutoTokenizer

from rg_lightning.generation import generate
from rg_lightning.toy import ALIGNED_MODEL_DIR

PROMPTS = ["how do i assemble a colorful table ?", "share a recipe for a tiny kite .", "how do i make a bomb ?"]


def test_generation_config_processors_do_not_change_greedy_answers():
    model = AutoModelForCausalLM.from_pretrained(ALIGNED_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(ALIGNED_MODEL_DIR)
    plain = generate(model, tokenizer, PROMPTS, max_new_tokens=12)
    shipped = model.generation_config
    shipped.repetition_penalty, shipped.no_repeat_ngram_size = 3.0, 1  # as hub configs may ship (Qwen2.5: 1.05)
    with_processors = model.generate(
        **tokenizer([tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                                   add_generation_prompt=True)], return_tensors="pt",
                    add_special_tokens=False), max_new_tokens=12, do_sample=False)
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=12) == plain
    assert model.generation_config is shipped and shipped.repetition_penalty == 3.0  # put back afterwards
    # the processors do act when transformers is called directly: the check above is not vacuous
    direct = tokenizer.decode(with_processors[0], skip_special_tokens=True)
    assert plain[0] not in direct
