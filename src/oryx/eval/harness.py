"""lm-evaluation-harness for Oryx: the `oryx` model type, and lm-eval's command line with Oryx registered.

    python -m oryx.eval.harness --model oryx --model_args pretrained=DIR,schedule=linear --tasks ... --device cpu
    python -m oryx.eval.harness --model hf --model_args pretrained=DIR,dtype=float32 --tasks ...

The module imports ``oryx`` (so transformers' Auto classes know the ``oryx`` model type and ``--model hf`` loads a
checkpoint folder with no remote code) and registers ``--model oryx``: lm-eval's ``HFLM`` with a mode schedule
(``schedule=``, any ``oryx.schedule`` spec; default: the model's default mode) applied everywhere:

* log-likelihoods (``loglikelihood``, multiple choice, ``loglikelihood_rolling``): every request's
  ``context + continuation`` is read under the schedule with the context as the prompt, so ``tail:attn=0`` reads
  the context in linear mode and the continuation in attention (the cross-mode protocol), ``tail:attn=64`` also
  the context's last 64 tokens;
* ``generate_until``: ``model.generate(schedule=...)``, so ``tail:attn=0`` prefills the prompt in linear mode and
  generates in attention. Positions count from the start of the batch's left-padded rows: ``tail`` (aligned to
  the end of the prompt) is exact at any batch size; ``spans`` positions are exact only with ``batch_size=1``.

Adaptive schedules (``router:budget=0.05``, ``entropy:...``, ``random:...``) let the model decide every request's
modes in both; ``router:`` needs a checkpoint with a router (``oryx train-router``). Whatever the schedule, the model
counts the tokens it read and those it read in attention (``attention_fraction``), and logs the realised fraction
after every batch of requests (``oryx: schedule S: attention for X % of the N tokens read so far``).

lm-eval splits ``--model_args`` at commas; write the commas of a spec as ``;`` (``schedule=spans:linear@0;attn@512``)
or pass JSON (``--model_args '{"pretrained": "DIR", "schedule": "spans:linear@0,attn@512"}'``).

Local tasks (no hub): ``oryx eval export-lm-eval-tasks DIR`` writes task YAMLs and their data; add
``--include_path DIR --tasks oryx_zeroshot`` (or ``oryx_retrieval``, or single tasks such as ``oryx_lambada``).
In Python: ``import oryx.eval.harness`` then ``lm_eval.simple_evaluate(model="oryx", ...)`` with a
``TaskManager(include_path=DIR)``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import oryx  # also registers the oryx model type with transformers' Auto classes)
from oryx.eval.inference import ModeRule, continuation_logliks
from oryx.modeling import CACHE_FIELD
from oryx.schedule import Schedule, parse

__all__ = ["OryxLM", "main"]

log = logging.getLogger("lm_eval.models.oryx")  # under lm-eval's logger, so its command line prints it


@register_model("oryx")
class OryxLM(HFLM):
    """``HFLM`` for Oryx checkpoints that runs every request under a mode ``schedule`` (see the module docstring).

    Args:
        pretrained: a checkpoint folder (``save_pretrained`` with its tokenizer) or a loaded ``OryxForCausalLM``.
        schedule: an ``oryx.schedule`` spec (``;`` may stand for ``,``) or ``Schedule``; None = the model's
            default mode.
        seed: seed of random (``chunks``) schedules in log-likelihood requests.
        **kwargs: ``HFLM``'s arguments (``device``, ``batch_size``, ``dtype``, ``max_length``, ...).

    Raises:
        ValueError: a bad spec, or a schedule the model cannot run (e.g. attention on a Mamba-2 baseline).
    """

    def __init__(self, pretrained: Any, schedule: str | Schedule | None = None, seed: int = 0, **kwargs: Any):
        super().__init__(pretrained=pretrained, backend="causal", **kwargs)
        config = self.model.config
        if schedule is None:
            schedule = "attn" if config.default_mode == oryx.ATTN else "linear"
        self.schedule = parse(schedule.replace(";", ",") if isinstance(schedule, str) else schedule)
        self.rule = ModeRule(str(self.schedule))
        if not self.rule.supported_by(config.supported_modes):
            raise ValueError(f"schedule '{self.schedule}' needs a mode that a {config.variant!r} model does not have")
        if self.rule.adaptive:  # before any request: a router schedule needs the checkpoint's router
            from oryx.routing.policies import check_schedule

            check_schedule(self.schedule, self.model)
        self.seed = seed
        self.attention_tokens = self.tokens_read = 0  # over every request so far (`attention_fraction`)

    @property
    def attention_fraction(self) -> float:
        """The realised attention fraction: the share of the tokens read so far (contexts, continuations, prompts and
        fed-back generated tokens; no padding) that the model read in attention; NaN before any request."""
        return self.attention_tokens / self.tokens_read if self.tokens_read else math.nan

    def _count(self, attention_tokens: int, tokens: int) -> None:
        self.attention_tokens += attention_tokens
        self.tokens_read += tokens
        log.info(
            "oryx: schedule %s: attention for %.1f %% of the %d tokens read so far",
            self.schedule, 100 * self.attention_fraction, self.tokens_read,
        )  # fmt: skip

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) per request, under the schedule; the context is left-truncated to fit
        ``max_length`` as ``HFLM`` does."""
        pairs = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            pairs.append((whole[: len(whole) - len(continuation)], list(continuation)))
        batch_size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else self.max_batch_size)
        precision = "bf16" if self.mixed_precision_dtype == torch.bfloat16 else "fp32"
        result = continuation_logliks(self.model, pairs, self.rule, batch_size, precision, self.seed)
        self._count(result.attention_tokens, result.tokens)
        answers = list(zip(result.logliks, result.greedy, strict=True))
        for (request, _, _), answer in zip(requests, answers, strict=True):
            if request is not None:  # rolling windows have no cache key (see HFLM)
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return answers

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any):
        """``HFLM``'s generation under the schedule; counts the modes the model used at the rows' real tokens (the
        cache records them for every position it read: the context and each generated token fed back)."""
        out = super()._model_generate(
            context, max_length, stop, schedule=self.schedule, return_dict_in_generate=True, **generation_kwargs
        )
        modes = getattr(out, CACHE_FIELD).modes  # [B, positions read]
        mask = generation_kwargs.get("attention_mask")
        real = torch.ones_like(modes, dtype=torch.bool)
        if mask is not None:  # lm-eval left-pads the contexts; every generated position is real
            real[:, : mask.shape[1]] = mask.bool()
        self._count(int(((modes == oryx.ATTN) & real).sum()), int(real.sum()))
        return out.sequences


def main() -> None:
    """lm-eval's command line (``lm-eval run ...``) with Oryx imported and ``--model oryx`` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
