"""SafetyBasis: everything RefusalGuard measured on the aligned model, as one checkpointable object.

It holds the difference-in-means candidates (per layer and post-instruction position), the protected
input subspace of every module, the token ids of the protected prompts (with their rows' pull-back weights when
some rows are damped), and metadata that ties it to
one model and one prompt set. It saves as ``basis.safetensors`` + ``basis.json`` in a directory.

Metadata written by RefusalDirections' options: ``selected`` (the chosen ``{"position", "layer"}``, which
``direction()`` returns), ``selection`` (every candidate's scores and any fallback reason) and
``filtering`` (how many prompts the refusal-score filter kept, and any fallback reason).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rg_lightning.atomic import atomic_directory
from rg_lightning.guard.shards import is_sharded

BASIS_FILES = ("basis.safetensors", "basis.json")  # what a saved basis holds (a later save may replace it)


EMBEDDING_PROBE_ROWS = 8  # protected tokens whose embedding rows a basis keeps as its weights' fingerprint
EMBEDDING_PROBE_TOLERANCE = 0.02  # relative change refused: bfloat16 rounding of the same weights is ~0.4%


def _input_embedding_weight(model: torch.nn.Module) -> Tensor | None:
    try:
        weight = getattr(model.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):
        return None
    return weight if isinstance(weight, Tensor) and weight.ndim == 2 else None


def embedding_probe(model: torch.nn.Module, token_ids: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The first :data:`EMBEDDING_PROBE_ROWS` protected tokens and their input-embedding rows (float32); none for a
    row-sharded (FSDP2) embedding, which only a gather of the whole table could read."""
    weight = _input_embedding_weight(model)
    if weight is None or is_sharded(weight) or token_ids.numel() == 0:
        return None, None
    ids = token_ids[:EMBEDDING_PROBE_ROWS].long().cpu()
    return ids, weight.detach()[ids.to(weight.device)].float().cpu()


def nonzero_candidates(candidates: Tensor) -> Tensor:
    """Which difference-in-means candidates ``[layers, positions, hidden]`` are directions: not zero up to rounding
    (layer 0 reads the embeddings of the same template tokens in every prompt, so its two means coincide)."""
    norms = candidates.double().norm(dim=-1)
    return norms > 1e-6 * norms.max()


@dataclass
class SafetyBasis:
    harmful_means: Tensor  # [layers, positions, hidden] float64, residual stream at each block's input
    harmless_means: Tensor  # same shape
    subspaces: dict[str, Tensor]  # module name -> [in_features, k] orthonormal (or weighted: soft_subspace), float32
    protected_token_ids: Tensor  # 1-D int64
    metadata: dict = field(default_factory=dict)
    # a few protected tokens' input-embedding rows as measured: ties the basis to these weights, not only to a
    # model name (two runs of one architecture have the same shapes); None in bases saved before it existed
    embedding_probe_ids: Tensor | None = None  # 1-D int64
    embedding_probe_rows: Tensor | None = None  # [len(ids), hidden] float32
    # each protected row's pull-back weight in [0, 1] (guard.subspace.row_weights), aligned with
    # protected_token_ids; None (and in bases saved before it existed): every row held exactly
    protected_token_weights: Tensor | None = None  # 1-D float32

    def __post_init__(self) -> None:
        if self.harmful_means.shape != self.harmless_means.shape or self.harmful_means.dim() != 3:
            raise ValueError(
                f"harmful and harmless means must both be [layers, positions, hidden]; got "
                f"{tuple(self.harmful_means.shape)} and {tuple(self.harmless_means.shape)}"
            )
        ids = self.protected_token_ids
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.ndim != 1:
            raise ValueError(f"SafetyBasis protected_token_ids must be 1-D integers, got {ids.dtype} of shape "
                             f"{tuple(ids.shape)}; the file is damaged or not a RefusalGuard basis.")
        if not isinstance(self.metadata, dict):
            raise ValueError(f"SafetyBasis metadata must be a JSON object, got {type(self.metadata).__name__}.")
        damaged = "; the file is damaged or not a RefusalGuard basis."
        if not (self.harmful_means.is_floating_point() and self.harmless_means.is_floating_point()):
            raise ValueError(f"SafetyBasis means must be floating point, got {self.harmful_means.dtype}{damaged}")
        for name, subspace in self.subspaces.items():
            if subspace.ndim != 2 or not subspace.is_floating_point():
                raise ValueError(f"SafetyBasis subspace {name} must be a 2-D float [in_features, k], got "
                                 f"{subspace.dtype} of shape {tuple(subspace.shape)}{damaged}")
        positions, dims = self.metadata.get("post_instruction_tokens"), self.metadata.get("subspace_dims") or {}
        if positions is not None and positions != self.harmful_means.shape[1]:
            raise ValueError(f"SafetyBasis metadata counts {positions} post-instruction positions, its means hold "
                             f"{self.harmful_means.shape[1]}{damaged}")
        wrong = [name for name, k in dims.items() if name in self.subspaces and self.subspaces[name].shape[1] != k]
        if wrong:
            raise ValueError(f"SafetyBasis metadata gives other subspace widths than its tensors for {wrong[:3]}"
                             f"{damaged}")
        if (self.embedding_probe_ids is None) != (self.embedding_probe_rows is None) or (
                self.embedding_probe_ids is not None
                and (self.embedding_probe_ids.is_floating_point() or self.embedding_probe_ids.ndim != 1
                     or tuple(self.embedding_probe_rows.shape) != (len(self.embedding_probe_ids), self.hidden_size))):
            raise ValueError(f"SafetyBasis embedding probe must be 1-D token ids and their [ids, hidden] rows{damaged}")
        weights = self.protected_token_weights
        if weights is not None and (not weights.is_floating_point() or weights.shape != ids.shape
                                    or not torch.isfinite(weights).all() or bool(((weights < 0) | (weights > 1)).any())
                                    or torch.unique(ids).numel() != ids.numel()):
            raise ValueError("SafetyBasis protected_token_weights must be one weight in [0, 1] per distinct protected "
                             f"token id{damaged}")
        for name, tensor in {"harmful_means": self.harmful_means, "harmless_means": self.harmless_means,
                             **{f"subspace {k}": v for k, v in self.subspaces.items()}}.items():
            if not torch.isfinite(tensor).all():
                raise ValueError(f"SafetyBasis {name} holds NaN or Inf values; recompute it on a healthy model.")
        selected = self.metadata.get("selected")
        if selected:
            layers, positions = self.harmful_means.shape[:2]
            if not (isinstance(selected, dict) and all(isinstance(selected.get(key), int) and
                                                       not isinstance(selected.get(key), bool)
                                                       for key in ("layer", "position"))):
                raise ValueError(f"SafetyBasis metadata `selected` must be {{'layer': int, 'position': int}}, got "
                                 f"{selected!r}; drop it or recompute the basis.")
            if not (0 <= selected["layer"] < layers and -positions <= selected["position"] < positions):
                raise ValueError(f"SafetyBasis metadata selects {selected}, outside its {layers} layers x {positions} "
                                 "positions; the metadata belongs to another basis. Drop `selected` or recompute.")

    @property
    def hidden_size(self) -> int:
        return self.harmful_means.shape[-1]

    @property
    def candidates(self) -> Tensor:
        """Unnormalised difference-in-means refusal directions, [layers, positions, hidden]."""
        return self.harmful_means - self.harmless_means

    @property
    def selected(self) -> dict:
        """The (position, layer) chosen by direction selection, else last position and middle layer.

        The fallback is the common default when no validation run chose one; positions count back from
        the answer start (-1 = last template token).
        """
        return self.metadata.get("selected") or {"position": -1, "layer": self.candidates.shape[0] // 2}

    def direction(self, layer: int | None = None, position: int | None = None) -> Tensor:
        """One unit refusal direction; by default the selected one (see ``selected``)."""
        layer = self.selected["layer"] if layer is None else layer
        position = self.selected["position"] if position is None else position
        vector = self.candidates[layer, position]
        if not nonzero_candidates(self.candidates)[layer, position]:
            raise ValueError(f"No refusal direction at layer {layer}, position {position}: the harmful and harmless "
                             "mean activations coincide there (e.g. layer 0, which reads the same template tokens "
                             "in every prompt). Pick another layer.")
        return vector / vector.norm()

    def layer_directions(self, position: int | None = None) -> Tensor:
        """Unit refusal direction of every layer at one position (default: the selected one), [layers, hidden]."""
        vectors = self.candidates[:, self.selected["position"] if position is None else position]
        return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    # -- checks ------------------------------------------------------------------------------------------------
    def check_compatible(self, model: torch.nn.Module, model_id: str | None = None) -> None:
        """Refuse a basis computed on another model: hidden size, layer count, module shapes, model id."""
        config = getattr(model, "config", None)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config  # multimodal: the decoder
        hidden = getattr(config, "hidden_size", None)
        if hidden is not None and hidden != self.hidden_size:
            raise ValueError(
                f"Safety basis has hidden size {self.hidden_size} but the model has {hidden}: it was computed on "
                f"another model ({self.metadata.get('model_id')!r}). Recompute it for this model."
            )
        layers = getattr(config, "num_hidden_layers", None)
        if layers is not None and layers != self.harmful_means.shape[0]:
            raise ValueError(f"Safety basis covers {self.harmful_means.shape[0]} layers, the model has {layers}: it "
                             f"was computed on another model ({self.metadata.get('model_id')!r}). Recompute it.")
        self._check_embedding_probe(model)
        from rg_lightning.guard.projection import canonical_name  # (projection's constraints check them again)

        widths = {canonical_name(n): getattr(m, "in_features", None) for n, m in model.named_modules()}
        for name, subspace in self.subspaces.items():
            width = widths.get(canonical_name(name))
            if isinstance(width, int) and subspace.shape[0] != width:
                raise ValueError(f"Safety basis holds a {subspace.shape[0]}-wide subspace for {name}, which reads "
                                 f"{width} features here: it was computed on another model. Recompute it.")
        saved_id = self.metadata.get("model_id")
        if model_id and saved_id and (os.path.basename(str(saved_id).rstrip("/"))
                                      != os.path.basename(model_id.rstrip("/"))):
            raise ValueError(
                f"Safety basis was computed on {saved_id!r}, not on {model_id!r}; recompute it or pass the right file."
            )

    def _check_embedding_probe(self, model: torch.nn.Module) -> None:
        """Two models of one architecture (two seeds, two runs saved under the same name) pass every shape check:
        compare a few protected tokens' embedding rows with the ones measured. Skipped for bases saved without
        them, models without a plain input embedding, and row-sharded (FSDP2) embeddings."""
        if self.embedding_probe_ids is None:
            return
        weight = _input_embedding_weight(model)
        if weight is None or is_sharded(weight):
            return
        ids = self.embedding_probe_ids
        if int(ids.max()) >= weight.shape[0]:
            raise ValueError(f"Safety basis protects token id {int(ids.max())}, beyond this model's {weight.shape[0]} "
                             "embedding rows: it was computed with another tokenizer and model. Recompute it.")
        rows = weight.detach()[ids.to(weight.device)].double().cpu()
        saved = self.embedding_probe_rows.double()
        change = float((rows - saved).norm() / saved.norm().clamp_min(1e-12))
        if change > EMBEDDING_PROBE_TOLERANCE:
            raise ValueError(
                f"Safety basis was measured on other weights: the input embeddings of {len(ids)} of its protected "
                f"tokens differ from the measured ones by {change:.1%} (model id {self.metadata.get('model_id')!r}; "
                "another model of the same architecture, or weights changed since). Recompute it for this model.")

    def check_rendering(self, chat_template_hash: str, system_prompt: str | None = None,
                        check_system_prompt: bool = True) -> None:
        """Refuse a basis measured on prompts rendered otherwise (another chat template, e.g. with reasoning
        turned off, or another system prompt): its post-instruction positions and protected inputs are others."""
        saved = self.metadata.get("chat_template_hash")
        if saved and saved != chat_template_hash:
            raise ValueError("Safety basis was measured with another chat template than the tokenizer's (changed "
                             "`chat_template` / `chat_template_kwargs`?); recompute it (drop `load`) or restore the "
                             "template it was measured with.")
        if (check_system_prompt and "system_prompt" in self.metadata
                and (self.metadata["system_prompt"] or None) != (system_prompt or None)):
            raise ValueError(f"Safety basis was measured with system prompt {self.metadata['system_prompt']!r}, not "
                             f"{system_prompt!r}; set RefusalDirections' `system_prompt` to it or recompute the basis.")

    # -- state -------------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        out = {"harmful_means": self.harmful_means, "harmless_means": self.harmless_means,
               "protected_token_ids": self.protected_token_ids}
        if self.embedding_probe_ids is not None:
            out.update({"embedding_probe_ids": self.embedding_probe_ids,
                        "embedding_probe_rows": self.embedding_probe_rows})
        if self.protected_token_weights is not None:
            out["protected_token_weights"] = self.protected_token_weights
        out.update({f"subspace.{name}": basis for name, basis in self.subspaces.items()})
        return {key: value.detach().cpu().contiguous() for key, value in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], metadata: dict) -> "SafetyBasis":
        missing = {"harmful_means", "harmless_means", "protected_token_ids"} - set(tensors)
        if missing:
            raise ValueError(f"Safety basis is missing {sorted(missing)}; the file is not a RefusalGuard basis.")
        subspaces = {k[len("subspace."):]: v for k, v in tensors.items() if k.startswith("subspace.")}
        return cls(tensors["harmful_means"], tensors["harmless_means"], subspaces, tensors["protected_token_ids"],
                   dict(metadata), tensors.get("embedding_probe_ids"), tensors.get("embedding_probe_rows"),
                   tensors.get("protected_token_weights"))

    def save(self, directory: str) -> str:
        """Write ``basis.safetensors`` and ``basis.json`` atomically (staged, then renamed)."""
        from safetensors.torch import save_file

        # Modules that read one tensor share one subspace object; safetensors refuses shared memory, so copy.
        tensors = {key: value.clone() for key, value in self.tensors().items()}
        with atomic_directory(directory, replaces=BASIS_FILES) as staging:
            save_file(tensors, os.path.join(staging, "basis.safetensors"))
            with open(os.path.join(staging, "basis.json"), "w") as handle:
                json.dump(self.metadata, handle, indent=2, sort_keys=True)
        return directory

    @classmethod
    def load(cls, directory: str) -> "SafetyBasis":
        from safetensors.torch import load_file

        tensors_path = os.path.join(directory, "basis.safetensors")
        if not os.path.isfile(tensors_path):
            raise FileNotFoundError(f"No basis.safetensors in {directory!r}; save one with SafetyBasis.save().")
        metadata_path = os.path.join(directory, "basis.json")
        if not os.path.isfile(metadata_path):
            raise FileNotFoundError(f"No basis.json next to basis.safetensors in {directory!r}; a basis is saved as "
                                    "both (SafetyBasis.save()).")
        with open(metadata_path) as handle:
            try:
                metadata = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{metadata_path} is not valid JSON ({error}); save the basis again.") from None
        try:
            tensors = load_file(tensors_path)
        except Exception as error:  # safetensors' own error type; e.g. a torch.save pickle under that name
            raise ValueError(f"{tensors_path} is not a safetensors file ({error}); a basis is saved with "
                             "SafetyBasis.save(), never as a pickle.") from None
        return cls.from_tensors(tensors, metadata)
