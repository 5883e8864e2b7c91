"""Screenshots of the napari-stem plugin for the README (run via scripts/screenshots).

plugin_preview.png: the spot grid, a region and the tissue mask before anything is computed;
plugin_mean.png: the default view after Predict (the mean on top, labelled colorbar);
plugin_uncertainty.png: the same spots' sd, one click away; plugin_inspector.png: a clicked spot.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("NAPARI_STEM_NOTHREADS", "1")  # deterministic: predict synchronously

OUT = Path(__file__).parent / "images"


def main() -> None:
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from stem_train.demo import FULL, ensure_demo_model, open_in_napari

    def settle(rounds: int = 50) -> None:
        for _ in range(rounds):
            QApplication.processEvents()

    paths = ensure_demo_model(FULL)
    viewer, widget = open_in_napari(paths, run_event_loop=False)
    viewer.window.show()
    viewer.window._qt_window.resize(1600, 1000)
    settle(20)
    OUT.mkdir(parents=True, exist_ok=True)

    # 1. before computing: the grid over the tissue, a region, the mask, count and cost
    viewer.layers["spot grid"].visible = False
    widget.spots.value = "grid over tissue"
    slide = viewer.layers["demo H&E"]
    height, width = (np.asarray(slide.extent.world[1]) - np.asarray(slide.extent.world[0]))[-2:]
    region = viewer.add_shapes(
        [
            np.array(
                [
                    [0.30 * height, 0.15 * width],
                    [0.30 * height, 0.85 * width],
                    [0.65 * height, 0.85 * width],
                    [0.65 * height, 0.15 * width],
                ]
            )
        ],
        shape_type="rectangle",
        name="region",
        units=("um", "um"),
        face_color="transparent",
        edge_color="yellow",
        edge_width=6,
    )
    widget.region.value = region
    widget.show_mask.value = True
    widget.preview.update()
    viewer.reset_view()
    settle()
    viewer.screenshot(str(OUT / "plugin_preview.png"), canvas_only=False)

    # 2. predict the whole tissue: the default view
    widget.show_mask.value = False
    widget.region.value = "whole slide"
    region.visible = False
    widget.steps.value = 25
    widget.run_button.clicked()
    settle()
    genes = list(widget.gene.choices)
    widget.gene.value = genes[min(3, len(genes) - 1)]
    viewer.reset_view()
    settle()
    viewer.screenshot(str(OUT / "plugin_mean.png"), canvas_only=False)

    # 3. the uncertainty, one click away
    mean, uncertainty = widget._result_layers["mean"], widget._result_layers["uncertainty"]
    mean.visible, uncertainty.visible = False, True
    viewer.layers.selection.active = uncertainty
    settle()
    viewer.screenshot(str(OUT / "plugin_uncertainty.png"), canvas_only=False)

    # 4. a clicked spot in the inspector
    mean.visible, uncertainty.visible = True, False
    viewer.layers.selection.active = mean
    values = mean.features[f"{widget.gene.value} mean"].to_numpy()
    widget.inspect_at(mean.data[int(np.argsort(values)[len(values) // 2])])
    settle()
    viewer.screenshot(str(OUT / "plugin_inspector.png"), canvas_only=False)
    print(f"wrote plugin_preview.png, plugin_mean.png, plugin_uncertainty.png and plugin_inspector.png in {OUT}")
    viewer.close()
    napari.Viewer.close_all()
    sys.exit(0)


if __name__ == "__main__":
    main()
