"""Parameter accounting: total, active per mode, shared, and the shared fraction as the paper counts it.

The paper's ">90% shared" is shared / active-per-mode with embeddings excluded (docs/paper.md §3.1): per layer the
modes share W_K, W_V, W_G, W_O, the conv, the norms and the MLP (12D²) out of ≈ 13D² active. Which parameter belongs
to which mode is the mixer's knowledge (`OryxMixer.mode_of`: the attention query, or the linear query and the
recurrence); a baseline's parameters all serve its one mode.
"""

from __future__ import annotations

from torch import nn

from oryx.layers.mixers import mode_specific
from oryx.variants import ATTN, LINEAR


def param_report(model: nn.Module, verbose: bool = True) -> dict[str, float]:
    """Count parameters of an `OryxForCausalLM` (or `OryxModel`); print a table unless `verbose=False`.

    Returns a dict with: total (all unique parameters; tied embeddings once), embedding, non_embedding, shared,
    attention_only, linear_only, active_attention, active_linear (non-embedding, active in that mode),
    active_attention_with_embedding, active_linear_with_embedding, and shared_fraction (shared / the larger per-mode
    active count).
    """
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    param_mode = {
        id(p): mode_specific(m, name)
        for m in model.modules()
        if hasattr(m, "mode_of")
        for name, p in m.named_parameters()
    }
    counts = {"embedding": 0, "shared": 0, ATTN: 0, LINEAR: 0}
    for param in model.parameters():  # unique tensors: the tied LM head is the embedding
        mode = param_mode.get(id(param))
        key = "embedding" if id(param) in embedding_ids else ("shared" if mode is None else mode)
        counts[key] += param.numel()
    shared, attn_only, linear_only, emb = counts["shared"], counts[ATTN], counts[LINEAR], counts["embedding"]
    report = {
        "total": shared + attn_only + linear_only + emb,
        "embedding": emb,
        "non_embedding": shared + attn_only + linear_only,
        "shared": shared,
        "attention_only": attn_only,
        "linear_only": linear_only,
        "active_attention": shared + attn_only,
        "active_linear": shared + linear_only,
        "active_attention_with_embedding": shared + attn_only + emb,
        "active_linear_with_embedding": shared + linear_only + emb,
    }
    report["shared_fraction"] = shared / max(report["active_attention"], report["active_linear"])
    if verbose:
        print(format_param_report(report))
    return report


def format_param_report(report: dict[str, float]) -> str:
    rows = [
        ("total (incl. tied embeddings)", report["total"]),
        ("embeddings", report["embedding"]),
        ("non-embedding", report["non_embedding"]),
        ("shared by both modes", report["shared"]),
        ("attention-only", report["attention_only"]),
        ("linear-only", report["linear_only"]),
        ("active, attention mode (+emb)", report["active_attention_with_embedding"]),
        ("active, linear mode (+emb)", report["active_linear_with_embedding"]),
    ]
    lines = [f"{name:<32}{value / 1e6:>10.2f}M" for name, value in rows]
    if report["attention_only"] == report["linear_only"] == 0:
        lines.append("single-mixer model: every parameter serves its one mode")
    else:
        lines.append(f"{'shared fraction (excl. emb)':<32}{report['shared_fraction']:>10.1%}")
    return "\n".join(lines)
