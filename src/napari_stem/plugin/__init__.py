"""Everything napari: the npe2 contributions (reader, writers, sample data, the predict widget) and
what only they use (layer data, result-layer styling, the spot inspector, the widget's Qt-free
controller, the torch guard).

Nothing outside this subpackage imports napari, Qt or magicgui (``tests/test_package.py``), so the
core, ``stem-train`` and cohort workers run without a display.
"""
