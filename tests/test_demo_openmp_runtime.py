"""The demo's first build keeps torch on its own OpenMP runtime (see stem_train.demo.load_torch_openmp_first).

numba (imported by scanpy's gene selection in ``prepare``) loads the system ``libgomp.so.1``; when that
happens before torch is imported, torch binds to it and CPU sampling later in the process runs nested
OpenMP teams. The check runs in a fresh interpreter because the load order is process-wide.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")

PROBE = textwrap.dedent(
    """
    import os
    {first}
    from numba.np.ufunc.parallel import _launch_threads
    _launch_threads()  # numba starts its threading layer (OpenMP where available), as scanpy's gene selection does
    import torch

    torch_lib = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))
    runtimes = {{line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}}
    shipped = [path for path in runtimes if os.path.realpath(path).startswith(torch_lib)]
    print("OK" if shipped else f"torch bound to another OpenMP runtime: {{sorted(runtimes)}}")
    """
)


def _run(first: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(first=first)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_demo_build_loads_torch_openmp_before_numba():
    pytest.importorskip("numba")
    if _run("pass") == "OK":
        pytest.skip("numba's threading layer does not load another OpenMP runtime here")
    assert _run("from stem_train.demo import load_torch_openmp_first; load_torch_openmp_first()") == "OK"
