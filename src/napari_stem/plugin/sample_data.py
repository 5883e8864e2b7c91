"""npe2 sample data: the real demo H&E slide with a Visium-like spot grid over its tissue, and the
demo model's prediction over it.

*File > Open Sample* calls these on napari's GUI thread, so nothing slow happens there: the grid
is the preview's (tissue found on the slide's stored thumbnail, milliseconds), and the demo
prediction (the first time: building the model, then embedding every spot: minutes on a CPU) runs
in a thread worker that adds its layers when done, with a progress bar and notifications.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: What the demo prediction is doing, for the progress bar and the notifications.
_STAGES = {"build": "building the demo model", "embed": "embedding spots", "sample": "sampling"}


def demo_slide() -> list:
    from napari_stem.datasets import demo_slide_path
    from napari_stem.plugin.layers import slide_layer_data, spots_layer_data
    from napari_stem.slide import open_slide

    slide = open_slide(demo_slide_path())
    return [slide_layer_data(slide, name="demo H&E"), spots_layer_data(_demo_spots(slide), name="demo spots")]


def _demo_spots(slide: Any) -> Any:
    """The default grid over the demo tissue: the spots the widget's preview and run lay there."""
    from napari_stem.caches import GridCache

    return GridCache().grid(slide.path, slide.require_mpp())


def _embedding_cache(slide_path: Path, spots: Any, checkpoint: Any) -> Path:
    """The widget's embedding file for these spots and this model (:func:`napari_stem.caches.embedding_cache_path`):
    predicting the same grid in the widget afterwards embeds nothing."""
    from napari_stem.caches import embedding_cache_path
    from napari_stem.stem.checkpoint import read_metadata

    if isinstance(checkpoint, (str, Path)):
        return embedding_cache_path(slide_path, spots, read_metadata(checkpoint).get("embedding"))
    return embedding_cache_path(slide_path, spots, checkpoint.embedding)  # a loaded StemCheckpoint


def demo_prediction() -> list:
    """The demo slide with the demo model's predicted mean and sd over its tissue grid, computed
    here and now (for scripts; napari's menu uses :func:`open_demo_prediction`, which does not block).

    Uses the cached demo model that ``stem-train demo`` trains once; embeddings are cached too, so
    opening this sample again only re-samples (a few seconds on a CPU).
    """
    from napari_stem.plugin.torch_guard import block_triton_if_llvm_loaded

    block_triton_if_llvm_loaded()  # napari's canvas may already hold Mesa's LLVM; see plugin.torch_guard
    from napari_stem.datasets import demo_checkpoint_path, demo_slide_path
    from napari_stem.plugin.layers import slide_layer_data
    from napari_stem.plugin.result_layers import label_colorbars_when_added
    from napari_stem.predict import predict
    from napari_stem.slide import open_slide
    from napari_stem.stem.checkpoint import load_checkpoint
    from napari_stem.values import PredictOptions

    checkpoint = load_checkpoint(demo_checkpoint_path())
    slide = open_slide(demo_slide_path())
    spots = _demo_spots(slide)
    cache_path = _embedding_cache(slide.path, spots, checkpoint)
    prediction = predict(slide.path, spots, checkpoint, PredictOptions(seed=0), cache_path=cache_path)
    label_colorbars_when_added()
    return [slide_layer_data(slide, name="demo H&E"), *_prediction_layers(prediction, spots, slide.path)]


def _prediction_layers(prediction: Any, spots: Any, slide_path: Any) -> list:
    from napari_stem.plugin.layers import prediction_layer_data

    return [
        prediction_layer_data(
            prediction, spots, kind, prefix="demo ", slide_path=str(slide_path), visible=kind == "mean"
        )
        for kind in ("sd", "mean")
    ]


def open_demo_prediction() -> list:
    """*File > Open Sample > Demo prediction*: the slide at once; the mean and sd layers follow from a
    thread worker (building the demo model first if needed), with a progress bar, so napari never
    freezes. Without a viewer (a script) this is :func:`demo_prediction`."""
    import napari

    viewer = napari.current_viewer()
    if viewer is None:
        return demo_prediction()
    from napari_stem.datasets import demo_slide_path
    from napari_stem.plugin.layers import slide_layer_data
    from napari_stem.slide import open_slide

    slide = open_slide(demo_slide_path())
    start_demo_prediction(viewer, slide.path)
    return [slide_layer_data(slide, name="demo H&E")]


def _demo_prediction_events(slide_path: Path) -> Any:
    """Worker: ``(stage, fraction)`` pairs while the grid is laid, the model built (once) and the
    spots embedded and sampled; returns ``(Prediction, Spots)``."""
    from napari_stem.plugin.torch_guard import block_triton_if_llvm_loaded

    block_triton_if_llvm_loaded()
    from napari_stem import known_models
    from napari_stem.predict import iter_predict
    from napari_stem.slide import open_slide
    from napari_stem.values import PredictOptions

    with open_slide(slide_path) as slide:
        spots = _demo_spots(slide)

    checkpoint = known_models.demo_checkpoint()
    if checkpoint is None:
        yield "build", 0.0
        from napari_stem.plugin.widget import build_demo_model

        checkpoint = build_demo_model()
    n_spots = max(len(spots), 1)
    prediction = None
    events = iter_predict(
        slide_path,
        spots,
        checkpoint,
        PredictOptions(seed=0),
        cache_path=_embedding_cache(slide_path, spots, checkpoint),
        step_events=True,
    )
    for event in events:
        if event.stage == "embed":
            yield "embed", 0.5 * event.done / n_spots
        elif event.stage == "step":
            step = event.batch
            yield (
                "sample",
                0.5 + 0.5 * (step.start + (step.stop - step.start) * step.step / max(step.n_steps, 1)) / n_spots,
            )
        elif event.stage == "done":
            prediction = event.prediction
    return prediction, spots


def start_demo_prediction(viewer: Any, slide_path: Path) -> Any:
    """Run the demo prediction in a thread worker; its layers are added to ``viewer`` when done.

    Returns the worker (tests wait on it). Progress shows in napari's activity bar; a
    notification says what is happening and when the layers are there, or why they are not.
    """
    from napari.qt.threading import create_worker
    from napari.utils import progress
    from napari.utils.notifications import show_error, show_info

    show_info(
        "napari-stem: predicting the demo slide in the background; the mean and sd layers appear when "
        "it is done (the first time the demo model is built and every spot embedded: a minute or more)."
    )
    bar = progress(total=100, desc="napari-stem demo prediction")
    shown = {"stage": "", "percent": 0}

    def on_progress(update: tuple[str, float]) -> None:
        stage, fraction = update
        if stage != shown["stage"]:
            shown["stage"] = stage
            bar.set_description(f"napari-stem demo: {_STAGES.get(stage, stage)}")
            if stage == "build":
                from napari_stem.datasets import DEMO_BUILD_TIME

                show_info(f"napari-stem: building the demo model once ({DEMO_BUILD_TIME}); it is kept for next time…")
        percent = min(99, int(100 * fraction))
        if percent > shown["percent"]:
            bar.update(percent - shown["percent"])
            shown["percent"] = percent

    def on_done(result: tuple[Any, Any]) -> None:
        bar.close()
        prediction, spots = result
        from napari.layers import Layer

        from napari_stem.plugin import result_layers

        try:
            for data, kwargs, layer_type in _prediction_layers(prediction, spots, slide_path):
                layer = viewer.add_layer(Layer.create(data, kwargs, layer_type))
                result_layers.show(layer)  # labelled colorbar, as the widget's layers
            viewer.layers.selection.active = layer
        except RuntimeError:  # the viewer was closed meanwhile
            return
        show_info("napari-stem: the demo prediction is in (mean shown; tick the sd layer's eye for its uncertainty).")

    def on_error(error: BaseException) -> None:
        bar.close()
        show_error(f"napari-stem: the demo prediction failed: {error}")

    worker = create_worker(
        _demo_prediction_events,
        slide_path,
        _start_thread=False,
        _connect={"yielded": on_progress, "returned": on_done, "errored": on_error},
    )
    worker.start()
    return worker
