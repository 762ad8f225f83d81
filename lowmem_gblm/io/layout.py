"""Model families as data: where a family keeps its blocks, embedding, final norm and head, and
which transformers classes build one decoder block. Adding a family is adding a row."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

import torch

from lowmem_gblm.errors import InputError


@dataclass(frozen=True)
class ExpertLayout:
    """Where a mixture of experts keeps its experts on disk and in transformers 5's modules.

    In the module (what the block computes with) the experts are fused: ``mlp.experts.gate_up_proj``
    [E, 2I, D] (each expert's gate rows, then its up rows), ``mlp.experts.down_proj`` [E, D, I], and the
    router is ``mlp.gate.weight``. Checkpoints (and transformers' own ``save_pretrained``) keep one 2-D
    tensor per expert and matrix, named by ``stored``. Those stored matrices are the pruned units, each
    with the tokens the router sends to its expert; the output keeps the checkpoint's layout.
    """

    stored: str  # a stored expert matrix, from {e} (expert) and {m} (one of the names below)
    gate_up: tuple[str, str]  # the two stored matrices whose rows make gate_up_proj[e] (gate, then up)
    down: str  # the stored matrix that is down_proj[e]
    router: str  # the router's stored name (module: mlp.gate.weight; never pruned)
    module: str = "mlp.experts"  # the fused experts module in transformers 5
    module_router: str = "mlp.gate.weight"

    def stored_name(self, e: int, m: str) -> str:
        return self.stored.format(e=e, m=m)

    def unit_name(self, e: int, m: str) -> str:
        """A stored matrix as a pruned unit: its name without ``.weight`` (as a linear's module name)."""
        return self.stored_name(e, m).removesuffix(".weight")

    def units(self, num_experts: int, inter: int) -> list[tuple[str, str, int, slice]]:
        """(stored matrix name without ``.weight``, fused parameter, expert, its rows in that parameter[e])."""
        out = []
        for e in range(num_experts):
            gate, up = self.gate_up
            out.append((self.unit_name(e, gate), f"{self.module}.gate_up_proj", e, slice(0, inter)))
            out.append((self.unit_name(e, up), f"{self.module}.gate_up_proj", e, slice(inter, 2 * inter)))
            out.append((self.unit_name(e, self.down), f"{self.module}.down_proj", e, slice(None)))
        return out

    def fuse(self, tensors: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
        """A block's tensors in the stored layout (names relative to the block) -> the module's layout."""
        out = dict(tensors)
        gate, up = self.gate_up
        pop = out.pop
        out[f"{self.module}.gate_up_proj"] = torch.stack([
            torch.cat([pop(self.stored_name(e, gate)), pop(self.stored_name(e, up))]) for e in range(num_experts)])
        out[f"{self.module}.down_proj"] = torch.stack([pop(self.stored_name(e, self.down))
                                                        for e in range(num_experts)])
        out[self.module_router] = pop(self.router)
        return out

    def stored_shapes(self, module_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The module layout's shapes -> the stored layout's (names relative to the block)."""
        out = dict(module_shapes)
        e_count, two_i, d = out.pop(f"{self.module}.gate_up_proj")
        _, _, inter = out.pop(f"{self.module}.down_proj")
        out[self.router] = out.pop(self.module_router)
        for e in range(e_count):
            for m in self.gate_up:
                out[self.stored_name(e, m)] = (two_i // 2, d)
            out[self.stored_name(e, self.down)] = (d, inter)
        return out


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    module: str  # transformers module holding the classes below
    layer_class: str
    rotary_class: str  # "" for vision transformers (no rotary embedding)
    norm_class: str
    layers_prefix: str = "model.layers"
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    # config.json sizes that must be positive integers (None allowed for the optional ones)
    sizes: tuple[str, ...] = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                              "vocab_size")
    optional_sizes: tuple[str, ...] = ("num_key_value_heads", "head_dim")
    eps_field: str = "rms_norm_eps"  # config.json's epsilon of the final norm
    # tensors some checkpoints carry that transformers ignores on load (buffers it recomputes): skipped,
    # not written to the output
    ignored_suffixes: tuple[str, ...] = (".rotary_emb.inv_freq",)
    # how config.json gives each layer its attention: "sliding_window" (one kind for every layer: sliding
    # when config.sliding_window is set, as Mistral/Phi-3/Mixtral build their mask) or "layer_types"
    # (config.layer_types[i], as Qwen2/Qwen3/Gemma 3 do)
    attention_kinds: str = "sliding_window"
    rotary_per_kind: bool = False  # the rotary class takes the layer's kind (Gemma 3: local and global rope)
    embed_scale: bool = False  # embeddings are multiplied by sqrt(hidden_size) (Gemma)
    bos_per_window: bool = False  # every calibration/evaluation window starts with BOS (Gemma needs it)
    experts: ExpertLayout | None = None  # mixtures of experts (see ExpertLayout)
    # -- vision transformers (task "image_classification": a classifier on the pooled final features;
    # "image_features": a backbone without one). Their encoder layers are the blocks, the patch embedding
    # module ``embeddings`` the embedding, the final layernorm (``final_norm``, with its bias) + ``lm_head``
    # (the classifier's weight) the head.
    task: str = "causal_lm"
    embeddings_class: str = ""  # the embeddings module's class (in ``module``), built at ``embed``'s prefix
    pooling: str = "cls"  # the classifier's input: "cls" (the CLS token) or "cls+mean" (CLS, mean of the patches)
    special_tokens: int = 1  # tokens before the patches (CLS; DeiT adds a distillation token)
    fixed_image_size: bool = True  # images must be config.image_size (ViT, DeiT); DINOv2 interpolates positions
    layer_idx: bool = True  # the layer class takes layer_idx (decoder layers do, encoder layers do not)
    # stored checkpoints (and transformers' own save_pretrained) may name block tensors differently from the
    # modules transformers 5 builds: ``stored_layers_prefix`` replaces ``layers_prefix`` and each
    # (module, stored) pair of ``stored_renames`` a start of the name inside a block. Engine, reports and
    # --targets use the module names; checkpoints are read and written with the stored ones.
    stored_layers_prefix: str | None = None
    stored_renames: tuple[tuple[str, str], ...] = ()

    @property
    def vision(self) -> bool:
        return self.task != "causal_lm"

    @property
    def embed_prefix(self) -> str:
        """Vision: ``embed`` names the embeddings module; its tensors are this prefix + their names in it."""
        return self.embed + "."

    def to_stored(self, name: str) -> str:
        """A full tensor name as transformers' modules name it -> as checkpoints store it."""
        return _rename(name, self.layers_prefix, self.stored_layers_prefix, self.stored_renames, 0)

    def to_module(self, name: str) -> str:
        """A full tensor name as a checkpoint stores it -> as transformers' modules name it."""
        return _rename(name, self.stored_layers_prefix, self.layers_prefix, self.stored_renames, 1)

    def cls(self, attr: str):
        return getattr(importlib.import_module(self.module), getattr(self, attr))

    def block_prefix(self, i: int) -> str:
        return f"{self.layers_prefix}.{i}."

    def ignored(self, name: str) -> bool:
        return name.endswith(self.ignored_suffixes)

    def layer_kinds(self, config) -> list[str]:
        """Each layer's attention kind, "full_attention" or "sliding_attention", as the full model builds
        its masks (transformers' ``create_causal_mask`` / ``create_sliding_window_causal_mask``)."""
        n = int(config.num_hidden_layers)
        if self.attention_kinds == "layer_types":
            kinds = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
        else:
            kinds = ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * n
        unknown = sorted(set(kinds) - set(ATTENTION_KINDS))
        if len(kinds) != n or unknown:
            raise InputError(f"config.json: layer_types {kinds!r} must name {n} layers, each one of "
                             f"{', '.join(ATTENTION_KINDS)}")
        return kinds

    def rotary_tables(self, config, position_ids, dtype, device=None) -> dict:
        """{attention kind: (cos, sin)} for ``position_ids`` [1, T], from the family's own rotary class."""
        rotary = self.cls("rotary_class")(config=config)
        if device is not None:
            rotary = rotary.to(device)
        probe = torch.zeros(1, position_ids.shape[-1], 1, device=position_ids.device, dtype=dtype)
        kinds = sorted(set(self.layer_kinds(config)))
        with torch.no_grad():
            if self.rotary_per_kind:
                return {k: rotary(probe, position_ids, k) for k in kinds}
            table = rotary(probe, position_ids)
        return dict.fromkeys(kinds, table)

    def check_sizes(self, config, where: str) -> None:
        """Refuse a config.json whose sizes are not positive integers, naming the field."""
        for field in self.sizes + self.optional_sizes:
            value = getattr(config, field, None)
            if value is None and field in self.optional_sizes:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"{where}: {field} is {value!r}; a positive integer is needed")
        if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) not in (None, 1):
            raise InputError(f"{where}: mlp_only_layers {getattr(config, 'mlp_only_layers', None)!r} / "
                             f"decoder_sparse_step {getattr(config, 'decoder_sparse_step', None)!r} mix dense and "
                             "expert blocks, which is not supported: every block must hold the same tensors")
        for field in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(config, field, None) is not None:
                raise InputError(f"{where}: {field} is {getattr(config, field)!r}; logit soft-capping is not "
                                 "supported (Gemma 2 uses it, Gemma 3 does not)")
        eps = getattr(config, self.eps_field, None)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise InputError(f"{where}: {self.eps_field} is {eps!r}; a number between 0 and 1 is needed")


ATTENTION_KINDS = ("full_attention", "sliding_attention")
LAYER_INDEX = re.compile(r"(\d+)\.(.*)", re.S)


def _rename(name: str, src_prefix: str | None, dst_prefix: str | None, renames: tuple[tuple[str, str], ...],
            side: int) -> str:
    """``name`` under ``src_prefix.<i>.`` -> under ``dst_prefix.<i>.``, its start inside the block replaced by
    the first matching pair of ``renames`` (``side``: which element of a pair ``name`` uses). Other names, and
    every name of a family without stored renames, are returned as they are."""
    if src_prefix is None or dst_prefix is None or not name.startswith(src_prefix + "."):
        return name
    m = LAYER_INDEX.fullmatch(name[len(src_prefix) + 1:])
    if m is None:
        return name
    rest = m.group(2)
    for pair in renames:
        if rest.startswith(pair[side]):
            rest = pair[1 - side] + rest[len(pair[side]):]
            break
    return f"{dst_prefix}.{m.group(1)}.{rest}"

_VIT_RENAMES = (("attention.q_proj.", "attention.attention.query."), ("attention.k_proj.", "attention.attention.key."),
                 ("attention.v_proj.", "attention.attention.value."),
                 ("attention.o_proj.", "attention.output.dense."))
_VIT_MLP_RENAMES = (("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."))


def _vit(base: str, embeddings_class: str, layers: str = "layers", rename_mlp: bool = False,
         fixed_size: bool = True) -> dict:
    """The fields every vision transformer row shares; ``base``: the backbone's attribute in the classifier
    ("" for a bare backbone)."""
    at = f"{base}." if base else ""
    return dict(task="image_classification", layers_prefix=f"{at}{layers}", stored_layers_prefix=f"{at}encoder.layer",
                stored_renames=_VIT_RENAMES + (_VIT_MLP_RENAMES if rename_mlp else ()),
                embed=f"{at}embeddings", embeddings_class=embeddings_class, final_norm=f"{at}layernorm.weight",
                lm_head="classifier.weight", sizes=VISION_SIZES, optional_sizes=(), eps_field="layer_norm_eps",
                ignored_suffixes=(), layer_idx=False, fixed_image_size=fixed_size)


VISION_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "image_size", "patch_size",
                "num_channels")

FAMILIES: tuple[Family, ...] = (
    # Llama 1-3 (Llama 3's rope scaling, rope_type "llama3", is the rotary class's business)
    Family("llama", ("LlamaForCausalLM",), "transformers.models.llama.modeling_llama",
           "LlamaDecoderLayer", "LlamaRotaryEmbedding", "LlamaRMSNorm"),
    Family("mistral", ("MistralForCausalLM",), "transformers.models.mistral.modeling_mistral",
           "MistralDecoderLayer", "MistralRotaryEmbedding", "MistralRMSNorm"),
    Family("qwen2", ("Qwen2ForCausalLM",), "transformers.models.qwen2.modeling_qwen2",
           "Qwen2DecoderLayer", "Qwen2RotaryEmbedding", "Qwen2RMSNorm", attention_kinds="layer_types"),
    # Qwen3: q/k RMSNorm inside attention (block tensors, not linears)
    Family("qwen3", ("Qwen3ForCausalLM",), "transformers.models.qwen3.modeling_qwen3",
           "Qwen3DecoderLayer", "Qwen3RotaryEmbedding", "Qwen3RMSNorm", attention_kinds="layer_types"),
    # Gemma 3 text: sliding and full layers with their own rope, four norms per block, scaled embedding
    Family("gemma3_text", ("Gemma3ForCausalLM",), "transformers.models.gemma3.modeling_gemma3",
           "Gemma3DecoderLayer", "Gemma3RotaryEmbedding", "Gemma3RMSNorm", attention_kinds="layer_types",
           rotary_per_kind=True, embed_scale=True, bos_per_window=True),
    # Phi-3/3.5: fused qkv_proj and gate_up_proj (ordinary linears, pruned per output row)
    Family("phi3", ("Phi3ForCausalLM",), "transformers.models.phi3.modeling_phi3",
           "Phi3DecoderLayer", "Phi3RotaryEmbedding", "Phi3RMSNorm"),
    # mixtures of experts (transformers 5: experts fused as mlp.experts.gate_up_proj [E, 2I, D] and
    # mlp.experts.down_proj [E, D, I]; the router mlp.gate is not an nn.Linear and is left dense)
    Family("mixtral", ("MixtralForCausalLM",), "transformers.models.mixtral.modeling_mixtral",
           "MixtralDecoderLayer", "MixtralRotaryEmbedding", "MixtralRMSNorm",
           experts=ExpertLayout("block_sparse_moe.experts.{e}.{m}.weight", ("w1", "w3"), "w2",
                                "block_sparse_moe.gate.weight")),
    Family("qwen3_moe", ("Qwen3MoeForCausalLM",), "transformers.models.qwen3_moe.modeling_qwen3_moe",
           "Qwen3MoeDecoderLayer", "Qwen3MoeRotaryEmbedding", "Qwen3MoeRMSNorm",
           experts=ExpertLayout("mlp.experts.{e}.{m}.weight", ("gate_proj", "up_proj"), "down_proj",
                                "mlp.gate.weight")),
    # -- vision transformers: the encoder layers are the blocks; transformers 5 renames their attention and MLP
    # modules, while checkpoints (and its own save_pretrained) keep the names of transformers 4
    Family("vit", ("ViTForImageClassification",), "transformers.models.vit.modeling_vit", "ViTLayer", "",
           "LayerNorm", **_vit("vit", "ViTEmbeddings", rename_mlp=True)),
    Family("deit", ("DeiTForImageClassification",), "transformers.models.deit.modeling_deit", "DeiTLayer", "",
           "LayerNorm", **_vit("deit", "DeiTEmbeddings", rename_mlp=True), special_tokens=2),
    # DINOv2: layer scale, and its classifier reads the CLS token and the mean of the patch tokens
    Family("dinov2", ("Dinov2ForImageClassification",), "transformers.models.dinov2.modeling_dinov2",
           "Dinov2Layer", "", "LayerNorm",
           **_vit("dinov2", "Dinov2Embeddings", layers="encoder.layer", fixed_size=False), pooling="cls+mean"),
    # a DINOv2 backbone alone: features, no classifier (methods without gradients only)
    Family("dinov2_backbone", ("Dinov2Model",), "transformers.models.dinov2.modeling_dinov2",
           "Dinov2Layer", "", "LayerNorm",
           **_vit("", "Dinov2Embeddings", layers="encoder.layer", fixed_size=False)
           | {"task": "image_features", "lm_head": ""}),
)


def supported_architectures() -> list[str]:
    return [a for f in FAMILIES for a in f.architectures]


def family_for(config) -> Family:
    archs = list(getattr(config, "architectures", None) or [])
    for family in FAMILIES:
        if any(a in family.architectures for a in archs) or (not archs and config.model_type == family.name):
            return family
    raise InputError(
        f"unsupported architecture {archs or config.model_type!r}; supported: {', '.join(supported_architectures())}"
    )
