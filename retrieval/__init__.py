"""Where drafts come from: the DraftTree type, fusion and pruning, and the drafters."""

from retrieval.drafters import Drafter, PromptLookupDrafter
from retrieval.tree import DraftTree, fuse, prune

__all__ = ["DraftTree", "fuse", "prune", "Drafter", "PromptLookupDrafter"]
