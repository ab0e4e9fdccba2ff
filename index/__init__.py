"""Numba kernels over flat numpy arrays: the structures drafts are retrieved from.

No torch and no file I/O here. Token ids are int32, stream positions int64; a negative
token in a stream is a separator (a document boundary no match or continuation crosses).
"""
