"""Evaluation task generators (model-independent): MQAR, needle in a haystack, record recall, LAMBADA-style
last word and multiple-choice next sentence, with the cross-mode protocol helpers they share."""

from oryx.eval.tasks.common import (
    PROTOCOLS,
    TextTokenizer,
    attention_fraction,
    encode_pieces,
    held_out_documents,
    protocol_modes,
    protocol_schedule,
    split_sentences,
    write_jsonl,
)
from oryx.eval.tasks.mqar import (
    IGNORE_INDEX,
    MQAR_TEST_GRID,
    MQAR_TEST_SEED,
    MQAR_TRAIN_MIX,
    MQAR_TRAIN_SEED,
    MQARBatch,
    MQARConfig,
    make_mqar,
    make_mqar_suite,
    mqar_accuracy,
    mqar_hits,
    mqar_leakage,
    mqar_modes,
)

__all__ = [
    "IGNORE_INDEX",
    "MQAR_TEST_GRID",
    "MQAR_TEST_SEED",
    "MQAR_TRAIN_MIX",
    "MQAR_TRAIN_SEED",
    "PROTOCOLS",
    "MQARBatch",
    "MQARConfig",
    "TextTokenizer",
    "attention_fraction",
    "encode_pieces",
    "held_out_documents",
    "make_mqar",
    "make_mqar_suite",
    "mqar_accuracy",
    "mqar_hits",
    "mqar_leakage",
    "mqar_modes",
    "protocol_modes",
    "protocol_schedule",
    "split_sentences",
    "write_jsonl",
]
