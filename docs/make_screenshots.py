"""Screenshots of the napari-stem plugin for the README (run via scripts/screenshots)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("NAPARI_STEM_NOTHREADS", "1")  # deterministic: predict synchronously

OUT = Path(__file__).parent / "images"


def main() -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    from stem_train.demo import FULL, ensure_demo_model, open_in_napari

    paths = ensure_demo_model(FULL)
    viewer, widget = open_in_napari(paths, run_event_loop=False)
    viewer.window.show()
    viewer.window._qt_window.resize(1550, 950)
    for _ in range(20):
        QApplication.processEvents()
    widget.n_samples.value = 4
    widget.steps.value = 10
    widget.run_button.clicked()
    for _ in range(50):
        QApplication.processEvents()
    genes = list(widget.gene.choices)
    widget.gene.value = genes[min(3, len(genes) - 1)]
    viewer.layers[-1].visible = False  # show the mean first
    viewer.reset_view()
    for _ in range(50):
        QApplication.processEvents()
    OUT.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(OUT / "plugin_mean.png"), canvas_only=False)
    viewer.layers[-1].visible = True
    viewer.layers[-2].visible = False
    for _ in range(50):
        QApplication.processEvents()
    viewer.screenshot(str(OUT / "plugin_variance.png"), canvas_only=False)
    print(f"wrote {OUT / 'plugin_mean.png'} and {OUT / 'plugin_variance.png'}")
    viewer.close()
    napari.Viewer.close_all()
    sys.exit(0)


if __name__ == "__main__":
    main()
