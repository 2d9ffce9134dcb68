"""Perplexity and bits per byte of a model on a token stream, under any mode schedule.

The stream is cut as training cuts it (`oryx.data.PackedDataset`): window i is `tokens[i*T : i*T + T + 1]`, the
model reads its first T tokens and predicts the last T, so every target is scored with the context since its
window's start. All windows together score every token but the first exactly once. A budget of fewer windows
(`max_tokens`) takes windows spread evenly over the whole stream, so that a subset samples every document rather
than only the first.

Bits per byte divide the total negative log-likelihood (in bits) by the UTF-8 bytes of the evaluated targets' text,
which makes models with different tokenizers comparable. Special tokens such as `<|endoftext|>` decode to nothing,
so they count no bytes. For byte-level BPE tokenizers (GPT-2's scheme, and every tokenizer `oryx.data` builds) each
token's bytes are known exactly, even where a window boundary cuts a multi-byte character; other tokenizers are
decoded window by window.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from oryx.losses import token_losses
from oryx.schedule import Adaptive, attention_scores, parse
from oryx.variants import ATTN

Reduce = Callable[[torch.Tensor], torch.Tensor]


def perplexity(nll: float) -> float:
    """exp(nll) without OverflowError: inf for a loss too large for a float's exponent (above ~709.78 nats)."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


@dataclass
class PerplexityResult:
    """Mean negative log-likelihood `nll` (nats per token) over `tokens` targets, and their UTF-8 `bytes`;
    `attention_fraction`: the realised fraction of the inputs read in attention; `attention_scores`: the query-key
    pairs attention scored for them (per head and layer: Σ over attention rows of the keys up to the row)."""

    schedule: str
    tokens: int
    nll: float
    bytes: int | None = None
    attention_fraction: float | None = None
    attention_scores: int | None = None

    @property
    def perplexity(self) -> float:
        """exp(nll); inf once that overflows a float (nll above ~709.78), NaN for a NaN loss."""
        return perplexity(self.nll)

    @property
    def bits_per_token(self) -> float:
        return self.nll / math.log(2)

    @property
    def bits_per_byte(self) -> float | None:
        return None if not self.bytes else self.nll * self.tokens / math.log(2) / self.bytes

    def to_dict(self) -> dict[str, float | int | str | None]:
        return {
            **asdict(self),
            "perplexity": self.perplexity,
            "bits_per_token": self.bits_per_token,
            "bits_per_byte": self.bits_per_byte,
        }


def window_indices(num_tokens: int, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Indices of the windows evaluated: all `(num_tokens − 1) // seq_len` of them, or, when `max_tokens` allows
    fewer, that many spread evenly over the stream (first and last included)."""
    total = (num_tokens - 1) // seq_len
    n = total if max_tokens is None else min(total, max(1, max_tokens // seq_len))
    if n == total:
        return np.arange(total)
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def window(tokens, index: int, seq_len: int) -> np.ndarray:
    """Window `index`: `seq_len + 1` tokens (inputs = all but the last, targets = all but the first)."""
    return np.asarray(tokens[index * seq_len : index * seq_len + seq_len + 1], dtype=np.int64)


def window_batches(tokens, seq_len: int, windows: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`windows` windows of `seq_len` tokens spread evenly over a token stream (`window_indices`), as (input_ids,
    aligned labels) batches of `batch_size`: `labels[:, t]` is the target of the prediction made at position t."""
    indices = window_indices(len(tokens), seq_len, windows * seq_len)
    rows = torch.from_numpy(np.stack([window(tokens, int(i), seq_len) for i in indices]))
    return [(part[:, :-1], part[:, 1:]) for part in rows.split(batch_size)]


def evaluated_targets(tokens, seq_len: int, indices: np.ndarray) -> np.ndarray:
    """The target tokens of the windows `indices`, concatenated [len(indices) · seq_len]."""
    return np.concatenate([window(tokens, int(i), seq_len)[1:] for i in indices])


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for precision "bf16" (or "auto" on GPU); no autocast otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def token_nll(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, modes: torch.Tensor, **kwargs
) -> torch.Tensor:
    """Per-token negative log-likelihood [B, T] (float32) of `targets` [B, T] given `inputs` [B, T] and `modes`."""
    return token_losses(model(inputs, modes=modes, **kwargs).logits, targets)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens,
    seq_len: int,
    schedule: str = "attn",
    *,
    batch_size: int = 8,
    max_tokens: int | None = None,
    seed: int = 0,
    tokenizer=None,
    precision: str = "fp32",
    rank: int = 0,
    world_size: int = 1,
    reduce: Reduce | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on `tokens`: every window, or `max_tokens` targets' worth spread over the stream.

    Args:
        model: an `OryxForCausalLM` (or a DDP/FSDP-wrapped one); put in eval mode by the caller.
        tokens: a 1-D token stream (numpy array or memmap, `oryx.data.load_tokens`).
        seq_len: T, tokens of context per window.
        schedule: mode schedule spec; `chunks` draws are seeded by `seed`, `tail:attn=N` treats each window as the
            prompt (its last N tokens in attention); an adaptive one (`router:`, ...) lets the model decide each
            window's modes, each window a fresh sequence.
        batch_size: windows per forward.
        tokenizer: if given, bytes (and so bits per byte) are counted from its decoding of the targets.
        precision: "fp32", "bf16" or "auto" (bf16 on GPU).
        rank, world_size, reduce: data-parallel evaluation: each rank scores an equal share of the windows and
            `reduce` sums a tensor over ranks (every rank runs the same number of forwards, as FSDP requires).

    Returns:
        PerplexityResult over N·T targets (N windows, rounded down to a multiple of world_size; see
        `window_indices`).
    """
    spec = parse(schedule)
    indices = window_indices(len(tokens), seq_len, max_tokens)
    n = len(indices) - len(indices) % world_size
    if n == 0:
        raise ValueError(f"{len(tokens)} tokens are too few for one window of {seq_len + 1} per rank")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    adaptive = isinstance(spec, Adaptive)  # the model decides each window's modes as it reads it
    all_modes = None if adaptive else spec.modes(n, seq_len, generator=generator, prompt_length=seq_len)  # [N, T]
    share = n // world_size
    total = torch.zeros(4, dtype=torch.float64, device=device)  # [nll sum, targets, attention rows, their scores]
    for start in range(rank * share, (rank + 1) * share, batch_size):
        rows = range(start, min(start + batch_size, (rank + 1) * share))
        batch = torch.from_numpy(np.stack([window(tokens, int(indices[r]), seq_len) for r in rows])).to(device)
        with autocast(device, precision):
            if adaptive:
                out = model(batch[:, :-1], schedule=spec)
                nll, modes = token_losses(out.logits, batch[:, 1:]), out.modes
            else:
                modes = all_modes[rows.start : rows.stop].to(device)
                nll = token_nll(model, batch[:, :-1], batch[:, 1:], modes)
        used = [nll.numel(), int((modes == ATTN).sum()), attention_scores(modes)]
        total += torch.cat([nll.double().sum()[None], torch.tensor(used, dtype=torch.float64, device=device)])
    if reduce is not None:
        total = reduce(total)
    count = int(total[1].item())
    num_bytes = None
    if tokenizer is not None:
        targets = [window(tokens, int(i), seq_len)[1:] for i in indices[:n]]
        table = token_bytes(tokenizer)
        if table is not None:
            num_bytes = int(sum(table[t].sum() for t in targets))
        else:
            texts = (tokenizer.decode(t.tolist(), skip_special_tokens=True) for t in targets)
            num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return PerplexityResult(
        schedule=str(spec),
        tokens=count,
        nll=float(total[0].item()) / count,
        bytes=num_bytes,
        attention_fraction=float(total[2].item()) / count,
        attention_scores=int(total[3].item()),
    )


def token_bytes(tokenizer) -> np.ndarray | None:
    """UTF-8 bytes of every token id of a byte-level BPE tokenizer (one vocabulary character per byte; added and
    special tokens count 0), or None for a tokenizer of another kind."""
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    lengths = np.zeros(len(tokenizer), dtype=np.int64)
    for token, index in tokenizer.get_vocab().items():
        lengths[index] = len(token)
    lengths[list(tokenizer.added_tokens_decoder)] = 0
    return lengths


def unigram_nll(train_tokens, eval_tokens, vocab_size: int) -> float:
    """Mean NLL (nats) of `eval_tokens` under a unigram model of `train_tokens` with add-one smoothing: the
    floor any trained language model must beat."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[np.asarray(eval_tokens, dtype=np.int64)].mean())
