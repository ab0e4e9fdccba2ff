"""Where drafts come from: the DraftTree type, fusion and pruning, and the drafters."""

from retrodraft.retrieval.config import LookupSettings, SpeculationConfig
from retrodraft.retrieval.corpus import Document, EmptyCorpusError, SkipCounts, iter_documents
from retrodraft.retrieval.drafters import Drafter, PromptLookupDrafter
from retrodraft.retrieval.build import BuildStats, tokenizer_fingerprint
from retrodraft.retrieval.errors import (
    CorruptDatastoreError,
    DatastoreError,
    DatastorePermissionError,
    FormatVersionError,
    IncompleteDatastoreError,
    KeyModelMismatchError,
    MissingKeysError,
    ReadOnlyDatastoreError,
    ShardTooLargeError,
    StaleDatastoreError,
    TokenizerMismatchError,
)
from retrodraft.retrieval.learned import ScopeError
from retrodraft.retrieval.online import LearnedMemory
from retrodraft.retrieval.speculator import Span, Speculator, choose_budget
from retrodraft.retrieval.store import Datastore
from retrodraft.retrieval.tree import DraftTree, fuse, prune

__all__ = ["DraftTree", "fuse", "prune", "Drafter", "PromptLookupDrafter", "Speculator", "SpeculationConfig",
           "LookupSettings", "Span", "choose_budget"]
__all__ += [
    "Datastore", "DatastoreError", "DatastorePermissionError", "CorruptDatastoreError", "FormatVersionError",
    "IncompleteDatastoreError", "KeyModelMismatchError", "MissingKeysError", "ReadOnlyDatastoreError",
    "ShardTooLargeError", "StaleDatastoreError", "TokenizerMismatchError", "tokenizer_fingerprint", "BuildStats",
    "Document", "EmptyCorpusError", "SkipCounts", "iter_documents", "ScopeError", "LearnedMemory",
]
