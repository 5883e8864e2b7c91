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


def demo_prediction() -> list:
    """The demo slide with the demo model's predicted mean and variance over its tissue grid.

    Uses the cached demo model that ``stem-train demo`` trains once; embeddings are cached too, so
    opening this sample again only re-samples (a few seconds on a CPU).
    """
    from napari_stem._torch_guard import block_triton_if_llvm_loaded

    block_triton_if_llvm_loaded()  # napari's canvas may already hold Mesa's LLVM; see _torch_guard
    from napari_stem._result_layers import label_colorbars_when_added
    from napari_stem.checkpoint import load_checkpoint
    from napari_stem.datasets import cache_dir, demo_checkpoint_path, demo_slide_path
    from napari_stem.grid import spots_over_tissue
    from napari_stem.layers import prediction_layer_data, slide_layer_data
    from napari_stem.predict import predict
    from napari_stem.slide import open_slide

    checkpoint = load_checkpoint(demo_checkpoint_path())
    slide = open_slide(demo_slide_path())
    spots = spots_over_tissue(slide)
    prediction = predict(slide.path, spots, checkpoint, cache_path=cache_dir() / "embeddings" / "demo_sample.h5", seed=0)
    label_colorbars_when_added()
    return [
        slide_layer_data(slide, name="demo H&E"),
        *(prediction_layer_data(prediction, spots, kind, prefix="demo ", slide_path=str(slide.path), visible=kind == "mean")
          for kind in ("sd", "mean")),
    ]
