"""Oryx: multi-mixer language models that switch between softmax attention and a linear recurrence per token.

import oryx
model = oryx.OryxForCausalLM(oryx.OryxConfig.from_preset("oryx-tg-tiny", vocab_size=512))
out = model(input_ids, modes=modes)       # modes [B, T]: 0 = attention, 1 = linear
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from oryx import ops, schedule, variants
from oryx.cache import OryxCache
from oryx.configuration import ATTN, LINEAR, OryxConfig, preset_names
from oryx.manifest import write_manifest
from oryx.modeling import OryxForCausalLM, OryxModel, OryxPreTrainedModel
from oryx.params import param_report

__version__ = "0.1.0"

AutoConfig.register("oryx", OryxConfig, exist_ok=True)
AutoModel.register(OryxConfig, OryxModel, exist_ok=True)
AutoModelForCausalLM.register(OryxConfig, OryxForCausalLM, exist_ok=True)

__all__ = [
    "ATTN",
    "LINEAR",
    "OryxCache",
    "OryxConfig",
    "OryxForCausalLM",
    "OryxModel",
    "OryxPreTrainedModel",
    "ops",
    "param_report",
    "preset_names",
    "schedule",
    "variants",
    "write_manifest",
]
