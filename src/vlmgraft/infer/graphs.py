"""Run a step function through a CUDA graph per input shape, or eagerly where graphs are off or fail.

On a GPU whose kernel launches are slow, a decode step of a 28-layer model is ~1,500 launches; replaying them as one
graph removes that overhead. Step functions here read and write only persistent ("static") tensors, so a graph
captured once per shape key can be replayed with new values in the same buffers.

The first call of a key runs the function eagerly (this is the real step, and the warm-up capture needs: lazy cuBLAS
setup, torch.compile's compilation) and then records the graph; capture executes nothing, so each call performs the
step exactly once. All graphs share one memory pool: they run one at a time on one stream, and every result a caller
reads lives in a buffer allocated outside the graphs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import torch

log = logging.getLogger(__name__)


class GraphRunner:
    def __init__(self, device: torch.device, enabled: bool, max_graphs: int = 512):
        self.device = device
        self.enabled = enabled and device.type == "cuda"
        self.max_graphs = max_graphs  # past this many shapes, new ones run eagerly (host memory, capture time)
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.failed: dict[Hashable, str] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None

    def run(self, key: Hashable, step: Callable[[], None]) -> None:
        if not self.enabled or key in self.failed or key not in self.graphs and len(self.graphs) >= self.max_graphs:
            step()
            return
        with torch.cuda.device(self.device):  # streams, capture and replay on the model's GPU, whichever thread
            if key in self.graphs:
                self.graphs[key].replay()
            else:
                self._first_run_and_capture(key, step)

    def _first_run_and_capture(self, key: Hashable, step: Callable[[], None]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                step()
        except Exception as err:  # a model op that cannot be captured: stay correct, just slower
            self.failed[key] = f"{type(err).__name__}: {err}"
            log.warning("CUDA graph capture failed for %s, running it eagerly: %s", key, self.failed[key])
            torch.cuda.synchronize()
            return
        self.graphs[key] = graph
