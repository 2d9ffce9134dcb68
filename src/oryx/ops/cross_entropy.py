"""Linear cross-entropy in token chunks: the mean next-token loss of `hidden @ weight.T` without the [N, V] logits.

    loss = mean over {i : targets[i] ≠ ignore_index} of  logsumexp(z_i) − z_i[targets[i]],   z = hidden @ weight.T

equals `F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)` (what `OryxForCausalLM.lm_loss`
computes plainly). The forward walks the N tokens `chunk_tokens` at a time: a chunk's logits [chunk, V] in float32,
its loss, and at once its logit gradient (softmax − onehot) / n_valid, from which the chunk's `grad_hidden` rows and
its share of `grad_weight` (summed in float32) follow. So the peak extra memory is one chunk's logits, not [N, V];
the backward only scales the saved gradients by the incoming one (as liger-kernel's fused linear cross-entropy does).

Under autocast the matmuls run in the autocast dtype and the logits are upcast from it, as in the plain loss. The
number of chunks comes from the static shape N, so `torch.compile` unrolls the loop into one graph.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int) -> Tensor:
        valid = targets != IGNORE_INDEX  # [N]
        n_valid = valid.sum()
        # 1 / n_valid on the counted rows, 0 elsewhere: without any target the loss is 0/0 = NaN and the gradients
        # are zero, as F.cross_entropy's.
        scale = torch.where(valid, 1.0 / n_valid, 0.0)  # [N] float32
        safe_targets = targets.masked_fill(~valid, 0)[:, None]  # [N, 1]: gather needs an index on ignored rows too
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # [V, D]
        grad_hidden = []
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h = hidden[rows]  # [c, D]
            logits = h @ weight.t()  # [c, V], the autocast dtype
            compute_dtype = logits.dtype
            logits = logits.float()
            target_logit = logits.gather(1, safe_targets[rows])  # [c, 1]
            # In place, so that the chunk holds one [c, V] float32 buffer (logsumexp would allocate a second): the
            # logits become exp(z − max), then their gradient, softmax minus one at the target, times the row's scale.
            row_max = logits.amax(-1, keepdim=True)  # [c, 1]
            probs = logits.sub_(row_max).exp_()
            sum_exp = probs.sum(-1, keepdim=True)  # [c, 1]
            total = total + torch.where(valid[rows, None], row_max + sum_exp.log() - target_logit, 0.0).sum()
            probs.div_(sum_exp).scatter_add_(1, safe_targets[rows], torch.full_like(target_logit, -1.0))
            grad_logits = probs.mul_(scale[rows, None]).to(compute_dtype)  # [c, V]
            grad_hidden.append(grad_logits @ weight)  # [c, D]
            grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(torch.cat(grad_hidden).to(hidden.dtype), grad_weight.to(weight.dtype))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, Tensor, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int) -> Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T` against `targets`, `chunk_tokens` tokens at a time.

    hidden [N, D], weight [V, D] (an LM head's; a tied embedding gets its gradient like any weight), targets [N]
    (-100 ignored) -> a float32 scalar. The gradients of `hidden` and `weight` come in their own dtypes.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)
