"""What the user waits for in the plugin, on the demo slide with the demo model (issue 13).

Prints: the first preview (tissue mask in a worker) and redraws after a grid setting changes
(target ≤ 1 s); the longest gap between progress-bar moves during a whole-tissue prediction in
the thread worker (target ≤ 2 s); how long Cancel takes to stop it (target ≤ 2 s).

Run under a display: ``xvfb-run -a python bench/bench_feedback.py`` (the demo model is trained on
first use, as ``stem-train demo`` does).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cancel-after", type=float, default=6.0, help="seconds of sampling before Cancel")
    args = parser.parse_args()

    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from stem_train.demo import FULL, ensure_demo_model

    paths = ensure_demo_model(FULL)
    viewer = napari.Viewer(show=True)
    viewer.open(str(paths.slide), plugin="napari-stem")
    _, widget = viewer.window.add_plugin_dock_widget("napari-stem", "Predict expression (Stem)")
    widget.use_threads = True

    def wait(condition, timeout: float) -> float:  # noqa: ANN001
        start = time.perf_counter()
        while not condition():
            QApplication.processEvents()
            time.sleep(0.005)
            if time.perf_counter() - start > timeout:
                raise TimeoutError("condition not met")
        return time.perf_counter() - start

    first = wait(lambda: widget.preview.preview is not None, 120)
    redraws = []
    for pitch in (150.0, 100.0, 200.0, 100.0):
        before = widget.preview.preview
        widget.pitch_um.value = pitch
        redraws.append(wait(lambda: widget.preview.preview is not before, 10))  # noqa: B023
    print(f"preview: first {first:.2f} s (tissue mask), redraws {', '.join(f'{s:.2f}' for s in redraws)} s "
          f"(max {max(redraws):.2f}; {widget.preview_info.value})")

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
    print(f"progress while sampling: {len(times)} moves in {clicked - sampling_started:.1f} s, "
          f"gap mean {np.mean(gaps):.2f} s, max {np.max(gaps):.2f} s; last status: {moves[-1][1] if moves else ''}")
    print(f"cancel latency: {latency:.2f} s ({widget.controller.message})")
    viewer.close()


if __name__ == "__main__":
    main()
