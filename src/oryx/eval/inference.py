"""Model-side scoring shared by the runners and the lm-eval model: mode rules, continuation log-likelihoods and
batched greedy generation, each under a per-sample mode assignment.

A *mode rule* says which mode every token of one sample uses. It is either a cross-mode protocol of
``oryx.eval.tasks.common.PROTOCOLS`` (``attn``, ``linear``, ``cross``, ``cross_reverse``: one mode for the
sample's context, another for its prompt and generation; the boundary is per sample) or an ``oryx.schedule``
spec (``tail:attn=64``, ``spans:linear@0,attn@512``, ``chunks:size=128,p_attn=0.25``), read by absolute position
in the sample, with the sample's prompt length for ``tail``. ``attn`` and ``linear`` mean the same either way. An
adaptive spec (``router:budget=0.05``, ``entropy:...``, ``random:...``) lets the model decide each sample's modes.

Batches are padded, but every row gets its own rule evaluated at its own positions, so a batch gives the same
numbers as one sample at a time (right padding for scoring cannot reach earlier positions of a causal model; left
padding for generation is masked and does not shift positions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from oryx.configuration import ATTN, LINEAR
from oryx.eval.perplexity import autocast
from oryx.eval.scoring import STOP, cut_at_stop
from oryx.eval.tasks.common import PROTOCOLS, protocol_modes
from oryx.modeling import CACHE_FIELD, OryxForCausalLM
from oryx.schedule import Adaptive, Fixed, Schedule, parse

__all__ = ["Generation", "LoglikResult", "ModeRule", "continuation_logliks", "greedy_generate"]


@dataclass(frozen=True)
class ModeRule:
    """A cross-mode protocol name or a schedule spec (see the module docstring); invalid specs raise ValueError."""

    spec: str
    schedule: Schedule | None = field(init=False, repr=False, compare=False)  # None for a protocol

    def __post_init__(self) -> None:
        schedule = None if self.spec in PROTOCOLS else parse(self.spec)  # parse validates
        object.__setattr__(self, "schedule", schedule)
        if schedule is not None:
            object.__setattr__(self, "spec", str(schedule))  # canonical, for reports

    @property
    def adaptive(self) -> bool:
        """Whether the model decides the modes as it reads (an `oryx.schedule.Adaptive` spec such as `router:`)."""
        return isinstance(self.schedule, Adaptive)

    def uses(self) -> set[int]:
        """The modes this rule may assign."""
        if self.spec in PROTOCOLS:
            return set(PROTOCOLS[self.spec])
        schedule = self.schedule
        return {schedule.mode} if isinstance(schedule, Fixed) else {ATTN, LINEAR}

    def supported_by(self, supported_modes: Sequence[int]) -> bool:
        """Whether a model with these modes can run the rule (a baseline runs only its own single mode)."""
        return self.uses() <= set(supported_modes)

    def modes(
        self, length: int, prompt_len: int, context_len: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Modes [length] of positions 0 … length−1 of one sample (not of an adaptive rule: the model decides those).

        Args:
            length: positions to cover (prompt, plus generated or continuation tokens).
            prompt_len: the prompt's length (the ``tail`` schedule's P).
            context_len: where a protocol switches from the context mode to the prompt mode.
            generator: random source of ``chunks`` schedules.
        """
        if self.spec in PROTOCOLS:
            return protocol_modes([context_len], length, self.spec)[0]
        return self.schedule.modes(1, length, prompt_length=prompt_len, generator=generator)[0]

    def __str__(self) -> str:
        return self.spec


@dataclass
class LoglikResult:
    """Per request: summed continuation log-likelihood and whether every continuation token was the argmax;
    with the tokens the model read (``attention_tokens`` of them in attention)."""

    logliks: list[float]
    greedy: list[bool]
    attention_tokens: int
    tokens: int

    @property
    def attention_fraction(self) -> float:
        return self.attention_tokens / self.tokens if self.tokens else math.nan


@dataclass
class Generation:
    """One greedy generation: the text before the stop string, and the tokens processed for it (prompt and
    generated tokens up to the stop), ``attention_tokens`` of them in attention."""

    text: str
    attention_tokens: int
    tokens: int


def _mode_arguments(rule: ModeRule, modes: torch.Tensor, start: int, stop: int) -> dict[str, object]:
    """The model's mode argument for positions `start … stop−1` of a batch: the schedule of an adaptive rule, else
    those columns of the precomputed `modes` [B, T]."""
    return {"schedule": rule.schedule} if rule.adaptive else {"modes": modes[:, start:stop]}


def _pad_mode(row: torch.Tensor) -> int:
    """The mode given to a padded position: one the row already uses, so a single-mode baseline accepts it."""
    return int(row[0]) if len(row) else ATTN


@torch.no_grad()
def continuation_logliks(
    model: OryxForCausalLM,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    rule: ModeRule,
    batch_size: int = 16,
    precision: str = "auto",
    seed: int = 0,
) -> LoglikResult:
    """log P(continuation | context) of each (context ids, continuation ids) request, as lm-eval scores it.

    The model reads ``context + continuation[:-1]`` under ``rule`` (prompt = context, so ``cross`` and
    ``tail:attn=0`` both put the context in linear mode and the continuation in attention) and the log-softmax at
    positions ``len(context) − 1 …`` scores the continuation tokens. Requests run longest first, right-padded (an
    adaptive rule decides each row's modes from its own tokens; the padding after them cannot change that).

    Raises:
        ValueError: an empty context or continuation.
    """
    if any(not ctx or not cont for ctx, cont in requests):
        raise ValueError("every request needs a non-empty context and continuation")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    logliks, greedy = [0.0] * len(requests), [False] * len(requests)
    attention_tokens = tokens = 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        inputs = [list(requests[i][0]) + list(requests[i][1])[:-1] for i in batch]
        width = len(inputs[0])
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        modes = torch.empty(len(batch), width, dtype=torch.long)
        for row, (i, inp) in enumerate(zip(batch, inputs, strict=True)):
            ids[row, : len(inp)] = torch.tensor(inp)
            if not rule.adaptive:
                ctx_len = len(requests[i][0])
                row_modes = rule.modes(len(inp), prompt_len=ctx_len, context_len=ctx_len, generator=generator)
                modes[row] = _pad_mode(row_modes)
                modes[row, : len(inp)] = row_modes
        with autocast(device, precision):
            if rule.adaptive:
                out = model.hidden_states(ids.to(device), schedule=rule.schedule)
            else:
                out = model.hidden_states(ids.to(device), modes=modes.to(device))
            hidden = out.last_hidden_state
            for row, (i, inp) in enumerate(zip(batch, inputs, strict=True)):
                attention_tokens += int((out.modes[row, : len(inp)] == ATTN).sum())
                tokens += len(inp)
                ctx, cont = requests[i]
                # Only the continuation's positions go through the vocabulary projection (B·T·V floats would not fit).
                scored = model.lm_head(hidden[row, len(ctx) - 1 : len(ctx) - 1 + len(cont)]).float().log_softmax(-1)
                cont_ids = torch.tensor(list(cont), device=device)
                logliks[i] = float(scored.gather(1, cont_ids[:, None]).sum())
                greedy[i] = bool((scored.argmax(-1) == cont_ids).all())
    return LoglikResult(logliks, greedy, attention_tokens, tokens)


@torch.no_grad()
def greedy_generate(
    model: OryxForCausalLM,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    rule: ModeRule,
    context_lens: Sequence[int] | None = None,
    max_new_tokens: int = 48,
    stop: str = STOP,
    batch_size: int = 8,
    precision: str = "auto",
    seed: int = 0,
) -> list[Generation]:
    """Greedy continuations of token-id ``prompts``, cut at the first ``stop`` (or end of text).

    Prompts are left-padded in batches of similar length, prefilled in one forward and decoded one token per
    step from the model's cache, every row under ``rule`` at its own positions (``context_lens[i]`` is prompt
    i's protocol switch point; default: the whole prompt is context). Under an adaptive rule the model decides
    every row's modes as it reads (the counts live in the cache), and the last generated token, which is never
    read, has no mode and is not counted. Token ids the tokenizer cannot decode (a vocabulary padded for fast
    matmuls) are never chosen.
    """
    context_lens = [len(p) for p in prompts] if context_lens is None else context_lens
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    results: list[Generation | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = len(prompts[batch[0]])
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        modes = torch.empty(len(batch), width + max_new_tokens, dtype=torch.long)
        for row, i in enumerate(batch):
            pad = width - len(prompts[i])
            ids[row, pad:] = torch.tensor(list(prompts[i]))
            mask[row, pad:] = 1
            if not rule.adaptive:
                row_modes = rule.modes(
                    len(prompts[i]) + max_new_tokens,
                    prompt_len=len(prompts[i]),
                    context_len=context_lens[i],
                    generator=generator,
                )
                modes[row] = _pad_mode(row_modes)
                modes[row, pad:] = row_modes
        ids, mask, modes = ids.to(device), mask.to(device), modes.to(device)

        generated = torch.empty(len(batch), 0, dtype=torch.long, device=device)
        used: list[int | None] = [None] * len(batch)  # per row: generated tokens up to and including its stop
        with autocast(device, precision):
            prefill = _mode_arguments(rule, modes, 0, width)
            out = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **prefill)
            for step in range(max_new_tokens):
                logits = out.logits[:, -1].float()
                logits[:, len(tokenizer) :] = -math.inf
                generated = torch.cat([generated, logits.argmax(-1, keepdim=True)], dim=1)
                for row in range(len(batch)):
                    new = generated[row].tolist()
                    if used[row] is None and (new[-1] == eos or stop in tokenizer.decode(new)):
                        used[row] = step + 1
                if all(u is not None for u in used) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
                out = model(
                    generated[:, -1:],
                    attention_mask=mask,
                    cache=getattr(out, CACHE_FIELD),
                    logits_to_keep=1,
                    **_mode_arguments(rule, modes, width + step, width + step + 1),
                )
        if rule.adaptive:
            modes = getattr(out, CACHE_FIELD).modes  # what the model decided for every token it read
        for row, i in enumerate(batch):
            n_used = used[row] or generated.shape[1]
            new = [t for t in generated[row, :n_used].tolist() if t != eos]
            processed = modes[row, width - len(prompts[i]) : width + n_used]
            results[i] = Generation(
                text=cut_at_stop(tokenizer.decode(new), (stop,)),
                attention_tokens=int((processed == ATTN).sum()),
                tokens=processed.numel(),
            )
    return results  # type: ignore[return-value]
