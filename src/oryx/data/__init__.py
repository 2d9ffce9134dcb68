"""Data without a hub: the embedded prose corpus, offline tokenizers, user data sources and batch packing."""

from oryx.data.corpus import CORPORA, SPLITS, Document, load_documents, load_text

__all__ = ["CORPORA", "SPLITS", "Document", "load_documents", "load_text"]
