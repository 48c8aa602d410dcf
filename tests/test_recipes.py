"""Each real recipe refers only to modules its architecture has (checked at tiny size, nothing downloaded)."""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2Config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FAMILIES = {
    "Qwen/Qwen2.5-7B-Instruct": (Qwen2Config, {}),
    "meta-llama/Llama-3.1-8B-Instruct": (LlamaConfig, {}),
    "google/gemma-2-9b-it": (Gemma2Config, {"head_dim": 8, "query_pre_attn_scalar": 8}),
}
RECIPES = sorted(p for p in EXPERIMENTS.glob("*.yaml") if yaml.safe_load(p.read_text())["model"]["init_args"]
                 ["model"] in FAMILIES)


def test_every_family_has_a_lora_and_a_qlora_recipe():
    models = [yaml.safe_load(p.read_text())["model"]["init_args"] for p in RECIPES]
    for family in FAMILIES:
        quantizations = {m.get("quantization") for m in models if m["model"] == family}
        assert {None, "nf4"} <= quantizations, family


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_modules_exist_in_a_tiny_build_of_its_architecture(recipe):
    from peft import LoraConfig, get_peft_model

    args = yaml.safe_load(recipe.read_text())["model"]["init_args"]
    config_class, extra = FAMILIES[args["model"]]
    config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, **extra)
    model = AutoModelForCausalLM.from_config(config)
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    targets = args["lora_target_modules"]
    assert set(targets) <= names, f"{recipe.name}: {set(targets) - names} not in {sorted(names)}"
    peft_model = get_peft_model(model, LoraConfig(r=args["lora_r"], lora_alpha=args["lora_alpha"],
                                                  target_modules=targets, task_type="CAUSAL_LM"))
    assert peft_model.get_nb_trainable_parameters()[0] > 0
    assert args["trust_remote_code"] is False
