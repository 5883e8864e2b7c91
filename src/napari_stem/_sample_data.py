"""npe2 sample data: the real demo H&E slide with a Visium-like spot grid over its tissue."""

from __future__ import annotations


def demo_slide() -> list:
    from napari_stem.datasets import demo_slide_path
    from napari_stem.grid import spots_over_tissue
    from napari_stem.layers import slide_layer_data, spots_layer_data
    from napari_stem.slide import open_slide

    slide = open_slide(demo_slide_path())
    spots = spots_over_tissue(slide)
    return [slide_layer_data(slide, name="demo H&E"), spots_layer_data(spots, name="demo spots")]
