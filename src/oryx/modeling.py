"""Oryx models in the transformers layout: config → block → `OryxModel` → `OryxForCausalLM`.

A block is pre-norm: h = x + mixer(norm(x)); out = h + SwiGLU(norm(h)). The mixer is the Oryx multi-mixer (or a
baseline's single mixer); `modes` [B, T] (0 = attention, 1 = linear) is the same for every layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from oryx import compat
from oryx.cache import OryxCache
from oryx.configuration import OryxConfig
from oryx.decoding import StaticDecoder
from oryx.layers.common import RMSNorm, SwiGLU
from oryx.layers.mixers import MixContext, Route, build_mixer, matched_intermediate_size, mode_flags
from oryx.ops.cross_entropy import linear_cross_entropy
from oryx.variants import ATTN, LINEAR

# transformers renamed the outputs' cache field from `past_key_values` to `cache` during 5.x; generation looks for
# the name its version knows, so the cache is returned under that one.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class OryxModelOutput(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus `modes` [B, T]: the modes the forward used (given, or decided by a schedule)."""

    modes: torch.Tensor | None = None


@dataclass
class OryxCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `modes` [B, T]: the modes the forward used (given, or decided by a schedule)."""

    modes: torch.Tensor | None = None


class OryxBlock(GradientCheckpointingLayer):
    def __init__(self, config: OryxConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = build_mixer(config)
        if config.intermediate_size is None:  # a baseline's MLP, widened to match Oryx's active parameters
            config.intermediate_size = matched_intermediate_size(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, hidden: torch.Tensor, ctx: MixContext, cache: OryxCache | None = None) -> torch.Tensor:
        state = None if cache is None else cache.layers[self.layer_idx]
        hidden = hidden + self.mixer(self.mixer_norm(hidden), ctx, state)
        return hidden + self.mlp(self.mlp_norm(hidden))


class OryxPreTrainedModel(PreTrainedModel):
    config_class = OryxConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OryxBlock"]
    _is_stateful = True  # the recurrent state cannot be cropped: generate() refuses assisted decoding

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, 0.02) matrices, residual-output projections scaled by 1/sqrt(2·layers) (GPT-2), Mamba-style
        decay parameters, unit norms."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            residual_out = getattr(module, "_is_residual_output", False)
            init.normal_(
                module.weight, mean=0.0, std=std / (2 * self.config.num_hidden_layers) ** 0.5 if residual_out else std
            )
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif hasattr(module, "reset_special_parameters"):
            module.reset_special_parameters()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generation uses OryxCache, created in prepare_inputs_for_generation

    def compile_blocks(self, cuda_graphs: bool = False, **options: Any) -> None:
        """Regional compilation, as torchtitan does it: `torch.compile` every block in place, and the LM head with
        its loss. The blocks are identical and their parameters are graph inputs, so one compiled graph serves all of
        them and compiling costs one block's worth. `cuda_graphs`: each compiled graph replays from a CUDA graph
        (inductor's `mode="reduce-overhead"`; the caller marks each step's start with
        `torch.compiler.cudagraph_mark_step_begin`). `options` go to `torch.compile` (default `fullgraph=True`: a
        block that breaks its graph is an error, not a slow path)."""
        options = {"fullgraph": True, **({"mode": "reduce-overhead"} if cuda_graphs else {}), **options}
        for block in getattr(self, self.base_model_prefix, self).layers:
            block.compile(**options)
        if hasattr(self, "lm_loss"):
            self.lm_loss = torch.compile(self.lm_loss, **options)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """transformers' `from_pretrained`; a local folder saved by Oryx 0.1.0 loads through `oryx.compat`'s key
        remap (with its config, onto the CPU; `dtype` is honoured). A folder's `router.safetensors` (`oryx
        train-router`) is attached to a causal LM (`OryxForCausalLM.router`)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        from oryx.routing.router import ROUTER_FILE, load_router

        folder = Path(pretrained_model_name_or_path)
        shards = sorted(p for p in folder.glob("*.safetensors") if p.name != ROUTER_FILE) if folder.is_dir() else []
        keys = [key for shard in shards for key in safe_open(shard, "pt").keys()]  # noqa: SIM118 (not a dict)
        if not compat.is_legacy(keys):
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            if folder.is_dir() and (folder / ROUTER_FILE).is_file() and hasattr(model, "attach_router"):
                model.attach_router(load_router(folder / ROUTER_FILE))
            return model
        config = kwargs.get("config") or OryxConfig.from_pretrained(folder)
        model = cls(config)
        state = compat.upgrade_state({k: v for shard in shards for k, v in load_file(shard).items()}, config)
        if not hasattr(model, "model"):  # the base model from a causal-LM folder
            state = {k.removeprefix(f"{cls.base_model_prefix}."): v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # the tied head is saved once, as the embedding
            raise ValueError(f"{folder} does not fit {cls.__name__}: missing {missing}, unexpected {unexpected}")
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return (model.to(dtype) if isinstance(dtype, torch.dtype) else model).eval()


class OryxModel(OryxPreTrainedModel):
    def __init__(self, config: OryxConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(OryxBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        for block in self.layers:
            block.mixer.o_proj._is_residual_output = True
            block.mlp.down_proj._is_residual_output = True
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        modes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: OryxCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        active_modes: tuple[bool, bool] | None = None,
        route: Route | None = None,
        **kwargs: Any,
    ) -> OryxModelOutput:
        """Final hidden states [B, T, D] and the modes used. `modes` [B, T] (0 = attention, 1 = linear; None =
        `config.default_mode`); `active_modes` = (whether any row of `modes` is attention, whether any is linear) when
        the caller knows it on the host (a CUDA-graph capture cannot read it back from the device); None derives it
        from `modes`. `route`: a routing decision (`oryx.routing`) that layer 0 makes after its linear branch, which
        replaces `modes` for every layer."""
        hidden = self._embed(input_ids, inputs_embeds)
        B, T = hidden.shape[:2]
        if cache is None and use_cache:
            cache = OryxCache(self.config)
        if cache is not None:
            if not isinstance(cache, OryxCache):
                raise TypeError(
                    f"cache must be an OryxCache (got {type(cache).__name__}); pass None to start a new one"
                )
            cache.check_compatible(self.config, B)
        past = 0 if cache is None else cache.get_seq_length()
        if past + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {past + T} (cached {past} + new {T}) exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}; shorten the input or raise max_position_embeddings"
            )
        ctx = self._context(modes, attention_mask, cache, B, T, hidden.device, active_modes)
        ctx.rotary(self.config.head_dim, self.config.rope_theta)  # once here, not inside a (compiled) block
        ctx.route = route
        for block in self.layers:
            hidden = block(hidden, ctx, cache)
        if ctx.route is not None:
            raise ValueError(f"a routing decision needs an Oryx mixer in layer 0; a {self.config.variant!r} has none")
        if cache is not None:
            real = torch.ones(B, T, dtype=torch.bool, device=hidden.device) if ctx.pad_mask is None else ctx.pad_mask
            cache.advance(real, ctx.modes)
        return OryxModelOutput(last_hidden_state=self.norm(hidden), modes=ctx.modes, **{CACHE_FIELD: cache})

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """The input embeddings [B, T, D], after checking what the caller passed (`_check_ids`, `_check_embeds`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            return self._check_embeds(inputs_embeds)
        self._check_ids(input_ids)
        return self.embed_tokens(input_ids)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        """[B, T] int64/int32 ids with B, T ≥ 1, in [0, vocab_size). The range check reads one min/max back to the
        host: skipped while compiling or capturing a CUDA graph (both forbid host syncs); free on CPU."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {list(input_ids.shape)}")
        if input_ids.dtype not in (torch.long, torch.int):
            raise TypeError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}; convert with .long()")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {list(input_ids.shape)}); pass at least one token per row")
        if torch.compiler.is_compiling() or (input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        low, high = torch.aminmax(input_ids)
        low, high = int(low), int(high)
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"input_ids holds token id {bad}, outside the model's vocabulary [0, {self.config.vocab_size}); "
                "encode with the model's tokenizer"
            )

    def _check_embeds(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """[B, T, hidden_size] floating embeddings with B, T ≥ 1, in the weights' dtype (or under autocast)."""
        if not isinstance(inputs_embeds, torch.Tensor):
            raise TypeError(f"inputs_embeds must be a torch.Tensor, got {type(inputs_embeds).__name__}")
        width = self.config.hidden_size
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != width:
            raise ValueError(
                f"inputs_embeds must be [batch, length, hidden_size={width}], got shape {list(inputs_embeds.shape)}"
            )
        if inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"inputs_embeds is empty (shape {list(inputs_embeds.shape)}); pass at least one token")
        weight = self.embed_tokens.weight.dtype
        if not inputs_embeds.dtype.is_floating_point:
            raise TypeError(f"inputs_embeds must be floating point ({weight}), got {inputs_embeds.dtype}")
        if inputs_embeds.dtype != weight and not torch.is_autocast_enabled(inputs_embeds.device.type):
            raise TypeError(
                f"inputs_embeds has dtype {inputs_embeds.dtype} but the model's weights are {weight}; "
                f"convert it with .to({weight})"
            )
        return inputs_embeds

    def _context(
        self, modes, attention_mask, cache: OryxCache | None, B: int, T: int, device, active_modes=None
    ) -> MixContext:
        """Validate modes and padding; derive rotary positions and the valid-key mask (cached keys included).

        Inside `torch.compile` nothing is read back to the host (it would break the graph): the modes' values are not
        checked, masks are kept even when all-true, and without `active_modes` both mixers run (exact, since each
        token then selects its mode's output)."""
        if cache is not None and cache.is_static:
            return self._static_context(modes, cache, B, T, device, active_modes)
        tracing = torch.compiler.is_compiling()
        modes = self._check_modes(modes, B, T, device)
        past = 0 if cache is None else cache.get_seq_length()
        pad_mask = _new_token_mask(attention_mask, B, T, past, device)
        first = (
            torch.zeros(B, dtype=torch.long, device=device)
            if cache is None or cache.num_real is None
            else cache.num_real
        )
        if pad_mask is None:
            positions = first[:, None] + torch.arange(T, device=device)
        else:
            positions = first[:, None] + (pad_mask.long().cumsum(1) - 1).clamp_min(0)
        key_mask = None
        cached_mask = None if cache is None else cache.key_mask
        if pad_mask is not None or (cached_mask is not None and (tracing or not bool(cached_mask.all()))):
            new = pad_mask if pad_mask is not None else torch.ones(B, T, dtype=torch.bool, device=device)
            key_mask = new if cached_mask is None else torch.cat([cached_mask, new], dim=1)
        attn_rows, has_attn, has_linear = mode_flags(modes, pad_mask, active_modes, tracing)
        return MixContext(modes, positions, pad_mask, key_mask, attn_rows, has_attn, has_linear)

    def _static_context(self, modes, cache: OryxCache, B: int, T: int, device, active_modes) -> MixContext:
        """One token per row over a static cache, without reading anything back to the host when the caller gives
        `active_modes` (a CUDA graph captures it; `oryx.decoding.StaticDecoder` passes them with validated [B, 1]
        modes on the device): the new tokens are real, and every cached key up to the new position is valid where
        the prompt was."""
        if T != 1:
            raise ValueError(f"a static cache takes one token per row and call, got {T}; prefill before make_static")
        cache.check_room()
        if active_modes is None:
            modes = self._check_modes(modes, B, T, device)
            has_attn, has_linear = bool((modes == ATTN).any()), bool((modes == LINEAR).any())
        else:
            has_attn, has_linear = active_modes
        new_key = torch.arange(cache.capacity, device=device) == cache.write_index
        key_mask = cache.key_mask | new_key
        attn_rows = (modes == ATTN) if has_linear else None
        return MixContext(modes, cache.num_real[:, None], None, key_mask, attn_rows, has_attn, has_linear)

    def _check_modes(self, modes, B: int, T: int, device) -> torch.Tensor:
        if modes is None:
            return torch.full((B, T), self.config.default_mode, dtype=torch.long, device=device)
        if not isinstance(modes, torch.Tensor):
            raise TypeError(
                f"modes must be a [batch, length] integer tensor (0 = attention, 1 = linear), got "
                f"{type(modes).__name__}; build one with oryx.schedule.parse(spec).modes(batch, length)"
            )
        if modes.dtype.is_floating_point or modes.dtype.is_complex or modes.dtype == torch.bool:
            raise TypeError(f"modes must be an integer tensor (0 = attention, 1 = linear), got dtype {modes.dtype}")
        if tuple(modes.shape) != (B, T):
            raise ValueError(f"modes has shape {list(modes.shape)} but input_ids has {[B, T]}")
        allowed = self.config.supported_modes
        bad = ~torch.isin(modes, torch.tensor(allowed, device=modes.device))
        if not torch.compiler.is_compiling() and bool(bad.any()):
            value = modes[bad][0].item()
            raise ValueError(
                f"modes contains {value}; variant {self.config.variant!r} accepts only {list(allowed)} "
                f"(0 = attention, 1 = linear)"
            )
        return modes.to(device=device, dtype=torch.long)


def _new_token_mask(attention_mask, B: int, T: int, past: int, device) -> torch.Tensor | None:
    """The padding mask of the new tokens [B, T] (None if all are real), from a [B, T] or [B, past + T] mask."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, past + T):
        raise ValueError(
            f"attention_mask has shape {list(attention_mask.shape)}; expected [{B}, {T}] (new tokens) "
            f"or [{B}, {past + T}] (cached + new)"
        )
    mask = attention_mask[:, -T:].to(device=device, dtype=torch.bool)
    return mask if torch.compiler.is_compiling() or not bool(mask.all()) else None


class OryxForCausalLM(OryxPreTrainedModel, GenerationMixin):
    """Oryx language model: `OryxModel` + tied LM head. `forward(input_ids, modes=..., labels=...)`,
    `generate(input_ids, schedule="tail:attn=64", ...)`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: OryxConfig):
        super().__init__(config)
        self.model = OryxModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def router(self) -> nn.Module | None:
        """The attached router (`oryx.routing.Router`) that `router:` schedules use, or None. It is no submodule: the
        model's parameters, state dict and `model.safetensors` stay the language model's alone, and the router lives
        in its own file (`router.safetensors`, saved by `save_pretrained`)."""
        return self.__dict__.get("_router")

    def attach_router(self, router: nn.Module | None) -> None:
        """Attach `router` (checked against this model's variant and width), or detach with None."""
        if router is not None:
            router.check_model(self.config)
        self.__dict__["_router"] = router

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        modes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: OryxCache | None = None,
        past_key_values: OryxCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        active_modes: tuple[bool, bool] | None = None,
        decoder: StaticDecoder | None = None,
        shift_labels: torch.LongTensor | None = None,
        loss_chunk_tokens: int = 0,
        schedule: Any = None,
        prompt_length: int | None = None,
        **kwargs: Any,
    ) -> OryxCausalLMOutput:
        """Logits [B, T, V] (or the last `logits_to_keep`), the modes used [B, T] (`out.modes`) and, with `labels`, the
        next-token loss (labels are shifted inside; -100 is ignored). `shift_labels` [B, T] instead: the targets
        already aligned with the positions (transformers' name; what the trainer passes, so that the last position has
        a target too). `loss_chunk_tokens` > 0 with a loss: computed `loss_chunk_tokens` tokens at a time
        (`oryx.ops.cross_entropy`) without materialising the logits, which come back as None.
        `cache`/`past_key_values` (the same thing) continues from an earlier call; `active_modes` as in
        `OryxModel.forward`. `decoder`: a `StaticDecoder` that runs this one-token step instead (what
        `generate(cuda_graphs=True)` passes for every step after the prompt).

        `schedule` (instead of `modes`): any `oryx.schedule` spec or `Schedule`. A fixed one gives the modes of the
        absolute positions (continuing after the cache; `tail` counts `prompt_length` prompt tokens, default all
        tokens so far); an adaptive one (`router:`, `entropy:`, `random:`) lets the model decide them while it reads
        the tokens, counting its budget on across calls through the cache."""
        cache = cache if cache is not None else past_key_values
        if decoder is not None:
            return OryxCausalLMOutput(
                logits=decoder.step(input_ids, modes), modes=modes, **{CACHE_FIELD: decoder.cache}
            )
        out, after = self._hidden_states(
            input_ids, modes, schedule, attention_mask, cache, use_cache, inputs_embeds, active_modes, prompt_length
        )
        hidden = out.last_hidden_state if not logits_to_keep else out.last_hidden_state[:, -logits_to_keep:]
        loss = None
        if labels is None and shift_labels is None:
            logits = self.lm_head(hidden)
        else:
            if labels is not None and shift_labels is not None:
                raise ValueError("pass labels (shifted inside) or shift_labels (already shifted), not both")
            name, given = ("labels", labels) if labels is not None else ("shift_labels", shift_labels)
            if given.shape != out.last_hidden_state.shape[:2]:
                raise ValueError(
                    f"{name} has shape {list(given.shape)} but input_ids has {list(out.last_hidden_state.shape[:2])}"
                )
            if logits_to_keep:
                raise ValueError(f"{name} need the logits of every position; do not pass logits_to_keep with {name}")
            # Position t predicts label t+1 and the last position has none: shifting the labels, not the logits,
            # keeps the [B·T, V] logits a view instead of a copy (at T = 4096, V = 8192: 134 MB per step).
            targets = shift_labels if labels is None else F.pad(labels[:, 1:], (0, 1), value=-100)
            logits, loss = self.lm_loss(hidden, targets, loss_chunk_tokens)
        if after is not None:
            if logits is None:
                raise ValueError(f"schedule '{schedule}' reads the forward's logits; pass loss_chunk_tokens=0 with it")
            after(logits)
        return OryxCausalLMOutput(loss=loss, logits=logits, modes=out.modes, **{CACHE_FIELD: out.get(CACHE_FIELD)})

    def hidden_states(
        self,
        input_ids: torch.LongTensor | None = None,
        modes: torch.Tensor | None = None,
        schedule: Any = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> OryxModelOutput:
        """The final hidden states [B, T, D] and the modes used [B, T] of one fresh sequence per row, without the
        vocabulary projection (for scoring a few positions of long inputs); `modes` or `schedule` as in `forward`."""
        out, _ = self._hidden_states(input_ids, modes, schedule, attention_mask, None, False, inputs_embeds)
        return out

    def _hidden_states(
        self,
        input_ids: torch.Tensor | None,
        modes: torch.Tensor | None,
        schedule: Any,
        attention_mask: torch.Tensor | None,
        cache: OryxCache | None,
        use_cache: bool | None,
        inputs_embeds: torch.Tensor | None,
        active_modes: tuple[bool, bool] | None = None,
        prompt_length: int | None = None,
    ) -> tuple[OryxModelOutput, Any]:
        """`OryxModel.forward` under `modes` or `schedule`, and what to call with the logits (None, or an adaptive
        schedule's update of the cache's routing state)."""
        after = route = None
        if schedule is not None:
            if modes is not None:
                raise ValueError("pass either modes or schedule, not both")
            if cache is None and use_cache:
                cache = OryxCache(self.config)
            modes, route, after = self._scheduled(
                schedule, input_ids, inputs_embeds, attention_mask, cache, prompt_length
            )
        out = self.model(
            input_ids=input_ids,
            modes=modes,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            inputs_embeds=inputs_embeds,
            active_modes=active_modes,
            route=route,
        )
        return out, after

    def _scheduled(
        self,
        schedule: Any,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: OryxCache | None,
        prompt_length: int | None,
    ) -> tuple[torch.Tensor | None, Route | None, Any]:
        """(modes, route, what to call with the logits) of one forward under `schedule` (see `forward`)."""
        from oryx.routing import policies
        from oryx.schedule import Adaptive, parse

        spec = parse(schedule)
        if isinstance(spec, Adaptive):
            route, after = policies.prepare(spec, self, input_ids, inputs_embeds, attention_mask, cache)
            return None, route, after
        B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        past = 0 if cache is None else cache.get_seq_length()
        prompt = past + T if prompt_length is None else prompt_length
        return spec.modes(B, T, offset=past, prompt_length=prompt, device=self.device), None, None

    def lm_loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 0
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Logits [B, T, V] of the final hidden states [B, T, D] and the mean loss against `targets` [B, T], the
        next token of each position (-100 ignored). `chunk_tokens` > 0: the same loss from `linear_cross_entropy`,
        that many tokens at a time, and no logits (None)."""
        if chunk_tokens:
            if self.lm_head.bias is not None:  # a head swapped in by set_output_embeddings
                raise ValueError("loss_chunk_tokens needs an output head without bias; pass loss_chunk_tokens=0")
            loss = linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten(), chunk_tokens)
            return None, loss
        logits = self.lm_head(hidden)
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        """transformers' `save_pretrained` (and `router.safetensors` when a router is attached), then
        `checksums.json` over the folder's files (`oryx.manifest`), which `oryx eval` and `oryx generate` verify.
        Save a tokenizer into the folder first, or call `oryx.write_manifest(folder)` after adding files."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from oryx.manifest import write_manifest
            from oryx.routing.router import save_router

            if self.router is not None:
                save_router(self.router, save_directory)
            write_manifest(save_directory)

    # --- generation -------------------------------------------------------------------------------------------
    def generate(
        self, inputs: torch.Tensor | None = None, schedule: Any = None, cuda_graphs: bool = False, **kwargs: Any
    ):
        """transformers' `generate` plus `schedule`: a spec string or `oryx.schedule.Schedule` giving the mode of
        every prompt and generated token by absolute position (e.g. "tail:attn=64": linear prefill, attention for the
        last 64 prompt tokens and all generated ones), or an adaptive one (`router:budget=0.05`, ...) under which the
        model decides each token's mode as it reads it. Without a schedule every token uses `config.default_mode`.
        The cache of the result (`return_dict_in_generate=True`) holds the modes of every processed token
        (`cache.modes`).

        `cuda_graphs=True`: after the prompt, preallocate the cache to the generation's length and replay every
        decoding step from a CUDA graph (`oryx.decoding`); without CUDA the same fixed-buffer step runs eagerly.
        Not with beam search."""
        from oryx.schedule import parse

        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("generate needs input_ids (the prompt)")
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None:
            raise ValueError(
                "assisted/speculative decoding needs a croppable cache; Oryx's recurrent state cannot be "
                "rewound. Use greedy, sampling or beam search."
            )
        from oryx.schedule import Adaptive

        spec = None if schedule is None else parse(schedule)
        if isinstance(spec, Adaptive):
            from oryx.routing.policies import check_schedule

            check_schedule(spec, self)
            if cuda_graphs:
                raise ValueError(f"cuda_graphs=True decodes under fixed schedules only, not the adaptive '{spec}'")
        decoder = None
        if cuda_graphs:
            if kwargs.get("num_beams", self.generation_config.num_beams or 1) > 1:
                raise ValueError("cuda_graphs=True cannot run beam search (a static cache cannot reorder rows)")
            new_tokens = kwargs.get("max_new_tokens")
            if new_tokens is None:
                new_tokens = kwargs.get("max_length", self.generation_config.max_length) - input_ids.shape[1]
            decoder = StaticDecoder(self, capacity=input_ids.shape[1] + max(new_tokens, 1))
        return super().generate(
            input_ids,
            oryx_schedule=spec,
            oryx_prompt_length=input_ids.shape[1],
            oryx_decoder=decoder,
            **kwargs,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: OryxCache | None = None,
        past_key_values: OryxCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        oryx_schedule: Any = None,
        oryx_prompt_length: int | None = None,
        oryx_decoder: StaticDecoder | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = OryxCache(self.config)
        seen = cache.get_seq_length() if cache is not None else 0
        new_ids = input_ids[:, seen:]
        one_token = seen > 0 and new_ids.shape[1] == 1  # past the prompt (a continued cache may bring several)
        decoder = oryx_decoder if oryx_decoder is not None and cache is not None and one_token else None
        if decoder is not None and decoder.cache is None:
            decoder.attach(cache)  # after the prompt: every decoding step from here runs on the static cache
        from oryx.schedule import Adaptive

        modes = schedule = None
        if isinstance(oryx_schedule, Adaptive):
            schedule = oryx_schedule  # the model decides the modes as it reads (its counts live in the cache)
        elif oryx_schedule is not None:
            modes = oryx_schedule.modes(
                new_ids.shape[0], new_ids.shape[1], offset=seen, prompt_length=oryx_prompt_length
            )
            if decoder is None:  # the decoder wants them on the host
                modes = modes.to(new_ids.device)
        return {
            "input_ids": new_ids,
            "modes": modes,
            "schedule": schedule,
            "attention_mask": attention_mask,
            "cache": cache,
            "use_cache": use_cache,
            "decoder": decoder,
        }
