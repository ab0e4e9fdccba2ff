"""The errors a datastore raises about itself, one type per cause."""

class DatastoreError(Exception):
    """Base of the errors a datastore raises about itself."""


class IncompleteDatastoreError(DatastoreError):
    """The directory has no completed metadata (an interrupted build, or not a datastore)."""


class CorruptDatastoreError(DatastoreError):
    """An Arrow file's size or checksum differs from the metadata."""


class FormatVersionError(DatastoreError):
    """The datastore was written in a format this code does not read."""


class TokenizerMismatchError(DatastoreError):
    """The datastore's tokenizer is not the one given."""


class ReadOnlyDatastoreError(DatastoreError):
    """A write was asked of a datastore opened with readonly=True."""


class StaleDatastoreError(DatastoreError):
    """The datastore at the path was replaced after this process opened it."""



class ShardTooLargeError(DatastoreError):
    """One datastore (or shard) would hold more tokens than its positions allow."""
