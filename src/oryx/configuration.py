"""`OryxConfig`: one config for the Oryx variants and the single-mixer baselines built from the same parts.

Variants and families come from the variant table (`oryx.variants`). Presets are named `<family>-<size>`: family ∈
{oryx-tg, oryx-tm, oryx-tk, transformer, gdn, mamba2, kda}, size ∈ {tiny, small, medium} (CPU work) or the paper's
{130m, 380m, 810m, 1.4b} (layers × width 12×768, 24×1024, 24×1536, 24×2048, GPT-2 vocabulary;
docs/paper.md §3.3).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import math
from typing import Any

from transformers import PreTrainedConfig

from oryx.variants import ATTN, FAMILIES, LINEAR, VARIANTS, variant

__all__ = ["ATTN", "GPT2_VOCAB", "LINEAR", "SIZES", "OryxConfig", "preset_names"]

GPT2_VOCAB = 50257

# size -> (num_hidden_layers, hidden_size, head_dim)
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 64),
    "small": (4, 256, 64),
    "medium": (6, 512, 128),
    "130m": (12, 768, 128),
    "380m": (24, 1024, 128),
    "810m": (24, 1536, 128),
    "1.4b": (24, 2048, 128),
}
# Transformer++ baselines keep GPT-3's head structure (docs/paper.md §4.3).
TRANSFORMER_HEAD_DIM = {"130m": 64, "380m": 64, "810m": 96, "1.4b": 128}


class OryxConfig(PreTrainedConfig):
    """Configuration of an Oryx model or of one of its single-mixer baselines.

    Args:
        variant: a row of the variant table (`oryx.variants.VARIANTS`): "tg" (attention + Gated DeltaNet), "tm"
            (attention + Mamba-2), "tk" (attention + Kimi Delta Attention), or a baseline: "transformer", "gdn",
            "mamba2", "kda".
        vocab_size, hidden_size, num_hidden_layers, max_position_embeddings: as in transformers.
        head_dim: per-head width of q, k, v (128 in the paper); num_heads = hidden_size // head_dim.
        intermediate_size: SwiGLU hidden width. None picks ≈ 8D/3 for Oryx and, for the baselines, the width that
            matches Oryx's active parameters per layer (docs/design.md §4); a baseline's is resolved when its model is
            built (`oryx.layers.mixers.matched_intermediate_size`).
        conv_size: width of the short causal depthwise conv on the shared keys and values.
        default_mode: the mode used when `modes=None` (0 = attention, 1 = linear). Baselines have one mode.
        chunk_size: chunk length of the chunked linear-recurrence algorithm (a numerical detail, not the mode chunk).
        mamba_head_dim, mamba_d_state, mamba_expand: the Mamba-2 baseline's shape (64, 128, 2).
        gdn_num_heads, gdn_head_dim_v: the delta-rule baselines' shape (gdn, kda; default ≈ 0.75·D/128 heads,
            value width 256, i.e. 1.5× Oryx's recurrent state as in the paper).
    """

    model_type = "oryx"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        variant: str = "tg",
        vocab_size: int = GPT2_VOCAB,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        head_dim: int = 128,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 2048,
        conv_size: int = 4,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        default_mode: int | None = None,
        initializer_range: float = 0.02,
        chunk_size: int = 64,
        mamba_head_dim: int = 64,
        mamba_d_state: int = 128,
        mamba_expand: int = 2,
        gdn_num_heads: int | None = None,
        gdn_head_dim_v: int = 256,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ):
        _validate_fields({k: v for k, v in locals().items() if k not in ("self", "kwargs", "__class__")}, kwargs)
        row = VARIANTS.get(variant)
        if row is None:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if hidden_size % head_dim:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of head_dim ({head_dim})")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        self.variant = variant
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.head_dim = head_dim
        self.num_heads = hidden_size // head_dim
        self.max_position_embeddings = max_position_embeddings
        self.conv_size = conv_size
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.chunk_size = chunk_size
        self.mamba_head_dim = mamba_head_dim
        self.mamba_d_state = mamba_d_state
        self.mamba_expand = mamba_expand
        self.gdn_num_heads = gdn_num_heads or max(1, round(0.75 * hidden_size / 128))
        self.gdn_head_dim_v = gdn_head_dim_v
        self.default_mode = self._check_default_mode(variant, default_mode)
        # A baseline's width matched to Oryx's parameters needs its mixers: resolved when the model is built.
        self.intermediate_size = intermediate_size or (round(8 * hidden_size / 3 / 8) * 8 if row.is_oryx else None)
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )

    @property
    def is_oryx(self) -> bool:
        """True for the multi-mixer variants, False for the single-mixer baselines (the variant table)."""
        return variant(self.variant).is_oryx

    @property
    def supported_modes(self) -> tuple[int, ...]:
        """The modes a token may take: (ATTN, LINEAR) for Oryx, the one mode of a baseline."""
        return variant(self.variant).modes

    @staticmethod
    def _check_default_mode(name: str, default_mode: int | None) -> int:
        row = variant(name)
        if default_mode is None:
            return row.default_mode
        if default_mode not in (ATTN, LINEAR):
            raise ValueError(f"default_mode must be 0 (attention) or 1 (linear), got {default_mode!r}")
        if default_mode not in row.modes:
            raise ValueError(
                f"variant {name!r} has a single mixer (mode {row.modes[0]}); default_mode {default_mode} is invalid"
            )
        return default_mode

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> OryxConfig:
        """Build a preset config, e.g. `OryxConfig.from_preset("oryx-tg-130m", vocab_size=8192)`."""
        family, _, size = name.rpartition("-")
        if family not in FAMILIES or size not in SIZES:
            raise ValueError(
                f"unknown preset {name!r}; presets are <family>-<size> with family in "
                f"{sorted(FAMILIES)} and size in {list(SIZES)}: {', '.join(preset_names())}"
            )
        layers, width, head_dim = SIZES[size]
        variant_name = FAMILIES[family].name
        if variant_name == "transformer":
            head_dim = TRANSFORMER_HEAD_DIM.get(size, head_dim)
        fields: dict[str, Any] = dict(
            variant=variant_name, hidden_size=width, num_hidden_layers=layers, head_dim=head_dim
        )
        if size in TRANSFORMER_HEAD_DIM:
            fields.update(vocab_size=GPT2_VOCAB, max_position_embeddings=2048)
        fields.update(overrides)
        return cls(**fields)


_POSITIVE_INTS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "head_dim", "intermediate_size", "max_position_embeddings",
    "conv_size", "chunk_size", "mamba_head_dim", "mamba_d_state", "mamba_expand", "gdn_num_heads", "gdn_head_dim_v",
)  # fmt: skip
_NONNEGATIVE_FLOATS = ("rms_norm_eps", "initializer_range")


def _validate_fields(fields: dict[str, Any], extra: dict[str, Any]) -> None:
    """Refuse impossible values of OryxConfig's own fields, and keys that are neither its fields nor attributes
    transformers' PreTrainedConfig knows (a typo such as `hiden_size` would otherwise become a silent attribute)."""
    for key in extra:
        if key not in _known_keys() and key != "num_heads":  # num_heads: derived, saved in config.json
            close = difflib.get_close_matches(key, [*fields, *_known_keys()], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"OryxConfig got an unknown key {key!r}{hint}")
    for key in _POSITIVE_INTS:
        value = fields[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    for key in _NONNEGATIVE_FLOATS:
        value = fields[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
    theta = fields["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, int | float) or not (math.isfinite(theta) and theta > 0):
        raise ValueError(f"rope_theta must be a finite number > 0, got {theta!r}")
    heads = extra.get("num_heads")
    if heads is not None and heads != fields["hidden_size"] // fields["head_dim"]:
        raise ValueError(
            f"num_heads ({heads}) does not match hidden_size // head_dim "
            f"({fields['hidden_size']} // {fields['head_dim']}); num_heads is derived, leave it out"
        )


@functools.lru_cache(maxsize=1)
def _known_keys() -> frozenset[str]:
    """Every key transformers' PreTrainedConfig accepts or saves (its fields, attributes and properties, the keys
    its __init__/__post_init__ read from kwargs, and the generation parameters it drops), from transformers
    itself, so that configs saved by any version load."""
    import dataclasses
    import inspect
    import re

    from transformers import GenerationConfig

    keys = set(PreTrainedConfig().to_dict())
    keys |= {n for n, value in inspect.getmembers(PreTrainedConfig) if not callable(value) and not n.startswith("__")}
    keys |= set(inspect.signature(PreTrainedConfig.__init__).parameters) - {"self", "args", "kwargs"}
    if dataclasses.is_dataclass(PreTrainedConfig):
        keys |= {f.name for f in dataclasses.fields(PreTrainedConfig)}
    with_kwargs = [PreTrainedConfig.__init__, getattr(PreTrainedConfig, "__post_init__", None)]
    for method in filter(None, with_kwargs):
        with contextlib.suppress(OSError, TypeError):  # no source (e.g. a frozen install): the rest still holds
            keys |= set(re.findall(r"kwargs\.(?:pop|get)\(\s*[\"'](\w+)[\"']", inspect.getsource(method)))
    with contextlib.suppress(AttributeError):
        keys |= set(GenerationConfig._get_default_generation_params())
    return frozenset(keys)


def preset_names() -> list[str]:
    """Every preset, `<family>-<size>`, in the variant table's order."""
    return [f"{family}-{size}" for family in FAMILIES for size in SIZES]
