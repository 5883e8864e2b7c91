"""From slide to embeddings, one idea per module.

``patches`` (which pixels around a spot the encoder sees, read lazily, in reading order),
``augment`` (the seven D4 views), ``encoders`` (the registry of names and the loaded encoders),
``weights`` (weights files: safe loading, identity, fitting a model), ``default_weights`` (a
registered encoder's weights from a package or the Hugging Face Hub), ``embed`` (streaming spots
through an encoder) and ``cache`` (one HDF5 file per slide, HEST-Bench layout).

Importing the subpackage imports nothing (no torch): each module is imported where it is needed.
"""
