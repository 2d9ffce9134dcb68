"""`oryx generate`: sample text from a checkpoint under a mode schedule, streaming it as it is produced.

    oryx generate runs/oryx-tg-default --prompt "KING HENRY:" --schedule "tail:attn=64" --max-new-tokens 200
    oryx generate CHECKPOINT --prompt-file prompt.txt --greedy

The schedule gives the mode of every prompt and generated token by absolute position (`oryx.schedule`): e.g.
`tail:attn=64` reads the prompt with the linear recurrence except its last 64 tokens and generates in attention.
At the end the command reports which fraction of the processed tokens used attention and how much memory each
state holds (KV cache, recurrent state, conv window), from the generation's `OryxCache`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from oryx.cli_common import (
    UsageError,
    add_device_argument,
    add_no_verify_argument,
    nonnegative_int,
    output_file,
    positive_float,
    positive_int,
    probability,
    resolve_device,
    seed,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("checkpoint", help="run folder, checkpoint folder or save_pretrained folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", metavar="FILE", help="read the prompt from this UTF-8 file ('-' = stdin)")
    parser.add_argument(
        "--schedule",
        default=None,
        help="mode schedule, e.g. attn, linear, 'tail:attn=64', 'spans:linear@0,attn@512', or adaptive: "
        "'router:budget=0.05' (needs oryx train-router), 'entropy:threshold=4', 'random:budget=0.05' (default: the "
        "model's default mode)",
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=200, help="tokens to generate at most (default: 200)"
    )
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    parser.add_argument("--temperature", type=positive_float, default=0.8, help="sampling temperature (default: 0.8)")
    parser.add_argument(
        "--top-k", type=nonnegative_int, default=50, help="sample among the k most likely tokens; 0 = all"
    )
    parser.add_argument(
        "--top-p", type=probability, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1.0 = off)"
    )
    parser.add_argument("--seed", type=seed, default=0, help="sampling seed (default: 0)")
    add_device_argument(parser)
    parser.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="preallocate the cache after the prompt and replay decoding steps from CUDA graphs (no beam search)",
    )
    add_no_verify_argument(parser)
    parser.add_argument(
        "--json", type=output_file, default=None, metavar="FILE", help="also write text and statistics to this file"
    )


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    schedule: str | None = None,
    *,
    max_new_tokens: int = 200,
    greedy: bool = False,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 1.0,
    seed: int = 0,
    streamer: Any = None,
    cuda_graphs: bool = False,
) -> dict[str, Any]:
    """Generate from `prompt`; returns the text, the token counts, the attention fraction and the state memory.

    The attention fraction counts every token the model processed (the prompt and all generated tokens but the
    last, which is never fed back) under `schedule`; memory is `OryxCache.memory_bytes()` at the end (allocated
    bytes per kind of state) and the KV cache's filled part.
    """
    import torch

    from oryx.modeling import CACHE_FIELD
    from oryx.schedule import attention_fraction, parse

    spec = parse(schedule) if schedule is not None else parse("attn" if model.config.default_mode == 0 else "linear")
    ids = torch.tensor([tokenizer(prompt).input_ids], device=model.device)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty; give at least one token of text")
    torch.manual_seed(seed)
    sampling = (
        dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    )
    out = model.generate(
        ids,
        schedule=spec,
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        cuda_graphs=cuda_graphs,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.eos_token_id,
        # ids past the tokenizer's (the vocabulary is padded for fast matmuls) have no text: never produce them
        suppress_tokens=list(range(len(tokenizer), model.config.vocab_size)) or None,
        **sampling,
    )
    cache = getattr(out, CACHE_FIELD)
    new = out.sequences[0, ids.shape[1] :]
    processed = cache.get_seq_length()
    # The modes the model used: recorded in the cache (not in a static one, whose schedule is a fixed one).
    modes = cache.modes if cache.modes is not None else spec.modes(1, processed, prompt_length=ids.shape[1])
    return {
        "schedule": str(spec),
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "prompt_tokens": ids.shape[1],
        "new_tokens": int(new.numel()),
        "processed_tokens": processed,
        "attention_fraction": attention_fraction(modes),
        "memory_bytes": cache.memory_bytes(),
        "kv_bytes_in_use": _kv_in_use(cache),
    }


def _read_prompt(path: str) -> str:
    """The prompt from a UTF-8 file ('-' = stdin); an unreadable file is refused, naming it."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_bytes().decode("utf-8")
    except OSError as err:
        raise UsageError(f"--prompt-file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--prompt-file {path} is not UTF-8 text") from None


def _kv_in_use(cache: Any) -> int:
    """Bytes of the KV cache's filled part (`memory_bytes()["kv"]` also counts the buffers' spare capacity)."""
    views = [t for layer in cache.layers for t in (layer.key, layer.value) if t is not None]
    return sum(t.numel() * t.element_size() for t in views)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer
    from transformers.utils import logging as hf_logging

    from oryx.checkpoint import load_pretrained

    hf_logging.disable_progress_bar()
    prompt = args.prompt if args.prompt is not None else _read_prompt(args.prompt_file)
    device = resolve_device(args.device)
    model, tokenizer, folder = load_pretrained(args.checkpoint, device, verify=args.verify)
    streamer = None if args.no_stream else TextStreamer(tokenizer, skip_special_tokens=True)
    try:
        result = generate(
            model,
            tokenizer,
            prompt,
            args.schedule,
            max_new_tokens=args.max_new_tokens,
            greedy=args.greedy,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            streamer=streamer,
            cuda_graphs=args.cuda_graphs,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.no_stream:
        print(prompt + result["text"])
    memory = result["memory_bytes"]
    print(
        f"\n--- {folder}: schedule {result['schedule']}; {result['prompt_tokens']} prompt + {result['new_tokens']} "
        f"generated tokens; attention for {result['attention_fraction']:.1%} of the {result['processed_tokens']} "
        f"processed tokens; state memory: KV cache {_mib(result['kv_bytes_in_use'])} in use "
        f"({_mib(memory['kv'])} allocated), recurrent {_mib(memory['recurrent'])}, "
        f"conv {_mib(memory['conv'])}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(folder), "prompt": prompt, **result}, indent=1))
    return 0
