"""Data without a hub: the embedded prose corpus, offline tokenizers, user data sources and batch packing.

>>> from oryx.data import load_tokenizer, load_tokens, PackedDataset
>>> tok = load_tokenizer("gpt2")
>>> data = PackedDataset(load_tokens("prose:train", tok), seq_len=512, batch_size=16, seed=0)
"""

from oryx.data.checks import check_token_ids, fingerprint
from oryx.data.corpus import CORPORA, SPLITS, Document, load_documents, load_text
from oryx.data.packing import PackedDataset
from oryx.data.sources import DataError, TokenShards, iter_documents, load_tokens
from oryx.data.tokenizer import (
    EOT,
    byte_tokenizer,
    default_cache_dir,
    gpt2_tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "CORPORA",
    "EOT",
    "SPLITS",
    "DataError",
    "Document",
    "PackedDataset",
    "TokenShards",
    "byte_tokenizer",
    "check_token_ids",
    "default_cache_dir",
    "fingerprint",
    "gpt2_tokenizer",
    "iter_documents",
    "load_documents",
    "load_text",
    "load_tokenizer",
    "load_tokens",
    "train_bpe",
]
