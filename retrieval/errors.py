"""The errors a datastore raises about itself, one type per cause."""

class DatastoreError(Exception):
    """Base of the errors a datastore raises about itself."""


class IncompleteDatastoreError(DatastoreError):
    """The directory has no completed metadata (an interrupted build, or not a datastore)."""


class CorruptDatastoreError(DatastoreError):
    """A file of the datastore is damaged: an Arrow file's size or checksum, LMDB's header, or a
    stored value's checksum differs from what was written."""


class FormatVersionError(DatastoreError):
    """The datastore was written in a format this code does not read."""


class TokenizerMismatchError(DatastoreError):
    """The datastore's tokenizer is not the one given."""


class ReadOnlyDatastoreError(DatastoreError):
    """A write was asked of a datastore opened with readonly=True."""


class StaleDatastoreError(DatastoreError):
    """The datastore at the path was replaced after this process opened it."""



class KeyModelMismatchError(DatastoreError):
    """The datastore's NEST keys were made by another model than the one given."""


class MissingKeysError(DatastoreError):
    """An append to a datastore with NEST keys was not given the model to extend them."""


class ShardTooLargeError(DatastoreError):
    """One datastore (or shard) would hold more tokens than its positions allow."""


class DatastorePermissionError(DatastoreError, PermissionError):
    """The process lacks a permission the datastore operation needs (named in the message)."""
