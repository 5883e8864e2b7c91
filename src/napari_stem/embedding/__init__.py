"""From slide to embeddings: spot patches, their D4 views, the encoder registry and its weights,
streaming embedding and the HDF5 cache.

Importing the subpackage imports nothing (no torch): each module is imported where it is needed.
"""
