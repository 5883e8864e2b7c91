"""What the user waits for in the plugin, on the demo slide with the demo model (issue 13).

Prints: the first preview (widget docked over the open slide) and the preview after choosing a
slide not seen before, then redraws after a grid setting changes and the tissue mask toggled
(target ≤ 1 s each); the demo prediction sample (File > Open Sample): when its slide shows, when
its layers arrive and the longest the GUI stood still meanwhile; the longest gap between
progress-bar moves during a whole-tissue prediction in the thread worker (target ≤ 2 s); how long
Cancel takes to stop it (target ≤ 2 s). ``--fresh-cache`` first builds the demo model from nothing
(in a temporary cache holding only the slide) and prints how long that took.

Run under a display: ``xvfb-run -a python bench/bench_feedback.py`` (the demo model is trained on
first use, as ``stem-train demo`` does).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cancel-after", type=float, default=6.0, help="seconds of sampling before Cancel")
    parser.add_argument("--fresh-cache", action="store_true", help="build the demo model from nothing first, timed")
    args = parser.parse_args()

    if args.fresh_cache:
        from napari_stem.datasets import demo_slide_path

        cache = Path(tempfile.mkdtemp(prefix="napari-stem-bench-"))
        shutil.copy(demo_slide_path(), cache)
        os.environ["NAPARI_STEM_CACHE"] = str(cache)
    import napari
    import numpy as np
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from stem_train.demo import FULL, ensure_demo_model

    started = time.perf_counter()
    paths = ensure_demo_model(FULL)
    built = time.perf_counter() - started
    if args.fresh_cache:
        print(
            f"demo model first build (data, prepare, fit) from nothing: {built:.0f} s; load average {os.getloadavg()}"
        )

    def wait(condition, timeout: float) -> float:
        start = time.perf_counter()
        while not condition():
            QApplication.processEvents()
            time.sleep(0.005)
            if time.perf_counter() - start > timeout:
                raise TimeoutError("condition not met")
        return time.perf_counter() - start

    # -- preview
    viewer = napari.Viewer(show=True)
    viewer.open(str(paths.slide), plugin="napari-stem")
    start = time.perf_counter()
    _, widget = viewer.window.add_plugin_dock_widget("napari-stem", "Predict expression (Stem)")
    widget.use_threads = True
    wait(lambda: widget.preview.preview is not None, 120)
    first = time.perf_counter() - start
    other = Path(tempfile.mkdtemp()) / "other_slide.svs"
    shutil.copy(paths.slide, other)
    viewer.open(str(other), plugin="napari-stem")
    before = widget.preview.preview
    start = time.perf_counter()
    widget.slide.value = viewer.layers["other_slide"]
    chosen = wait(lambda: widget.preview.preview is not before, 120)
    viewer.layers.remove("other_slide")
    wait(lambda: widget.preview.preview is not None and widget.slide.value is viewer.layers[0], 10)
    redraws = []
    for pitch in (150.0, 100.0, 200.0, 100.0):
        before = widget.preview.preview
        widget.pitch_um.value = pitch
        redraws.append(wait(lambda: widget.preview.preview is not before, 10))  # noqa: B023
    before = widget.preview.preview
    widget.show_mask.value = True
    mask = wait(lambda: widget.preview.preview is not before, 10)
    print(
        f"preview: first {first:.2f} s (widget docked), {chosen:.2f} s after choosing an unseen slide, redraws "
        f"{', '.join(f'{s:.2f}' for s in redraws)} s (max {max(redraws):.2f}), tissue mask shown in {mask:.2f} s "
        f"({widget.preview_info.value})"
    )
    widget.show_mask.value = False

    # -- the demo prediction sample, in its own viewer
    sample_viewer = napari.Viewer(show=True)
    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(50)
    start = time.perf_counter()
    sample_viewer.open_sample("napari-stem", "demo_prediction")
    slide_shown = time.perf_counter() - start
    arrived = wait(lambda: len(sample_viewer.layers) >= 3, 900) + slide_shown
    timer.stop()
    shown_at = start + slide_shown
    gaps = np.diff([shown_at, *(t for t in ticks if t > shown_at)])
    print(
        f"demo prediction sample: slide shown after {slide_shown:.2f} s, mean/sd layers after {arrived:.1f} s, "
        f"GUI still for at most {gaps.max():.2f} s in between"
    )
    sample_viewer.close()

    # -- a whole-tissue prediction: progress and cancel
    widget.checkpoint.value = paths.checkpoint
    moves: list[tuple[float, str]] = []
    widget.progress.changed.connect(lambda _value: moves.append((time.perf_counter(), widget.status.value)))
    widget.run_button.clicked()
    wait(lambda: widget.controller.stage == "sample", 600)
    sampling_started = time.perf_counter()
    wait(lambda: time.perf_counter() - sampling_started > args.cancel_after or not widget.controller.running, 600)
    clicked = time.perf_counter()
    if widget.controller.running:
        widget.cancel_button.clicked()
        latency = wait(lambda: not widget.controller.running and widget.worker is None, 60)
    else:
        latency = float("nan")
    times = [t for t, status in moves if t >= sampling_started and t <= clicked]
    gaps = np.diff(times) if len(times) > 1 else np.array([float("nan")])
    print(
        f"progress while sampling: {len(times)} moves in {clicked - sampling_started:.1f} s, "
        f"gap mean {np.mean(gaps):.2f} s, max {np.max(gaps):.2f} s; last status: {moves[-1][1] if moves else ''}"
    )
    print(f"cancel latency: {latency:.2f} s ({widget.controller.message})")
    viewer.close()


if __name__ == "__main__":
    main()
