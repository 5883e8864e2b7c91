"""stem-train: the training toolkit of napari-stem (console script ``stem-train``)."""
