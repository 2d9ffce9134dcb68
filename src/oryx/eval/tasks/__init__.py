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
from oryx.eval.tasks.lambada import STOPWORDS, LambadaSample, make_lambada
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
from oryx.eval.tasks.next_sentence import NextSentenceSample, make_next_sentence
from oryx.eval.tasks.niah import NIAH_TASKS, NiahSample, make_niah
from oryx.eval.tasks.records import ATTRIBUTES, FORMATS, RecordSample, make_records

__all__ = [
    "ATTRIBUTES",
    "FORMATS",
    "IGNORE_INDEX",
    "MQAR_TEST_GRID",
    "MQAR_TEST_SEED",
    "MQAR_TRAIN_MIX",
    "MQAR_TRAIN_SEED",
    "NIAH_TASKS",
    "PROTOCOLS",
    "STOPWORDS",
    "LambadaSample",
    "MQARBatch",
    "MQARConfig",
    "NextSentenceSample",
    "NiahSample",
    "RecordSample",
    "TextTokenizer",
    "attention_fraction",
    "encode_pieces",
    "held_out_documents",
    "make_lambada",
    "make_mqar",
    "make_mqar_suite",
    "make_next_sentence",
    "make_niah",
    "make_records",
    "mqar_accuracy",
    "mqar_hits",
    "mqar_leakage",
    "mqar_modes",
    "protocol_modes",
    "protocol_schedule",
    "split_sentences",
    "write_jsonl",
]
