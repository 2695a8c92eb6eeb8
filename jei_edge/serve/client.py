"""A small ``tritonclient`` wrapper for the served models, and the check of an answer against the runtime.

Used by the tests and ``benchmarks/serving.py`` (one client, one comparison). ``tritonclient`` is
imported lazily: it is only in the serving environment.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from jei_edge.serve.handler import INPUT, RAW_INPUT

EXACT = ("class", "exit", "conformal_set")  # must be equal
CLOSE = ("probs", "confidence", "cost")  # within ``atol``


class Client:
    """One connection to a served model over ``http`` or ``grpc`` (not shared between threads).

    Args:
        url: ``host:port`` of the protocol's endpoint.
        model: the Triton model name.
        timeout_s: network and inference timeout per request.
    """

    def __init__(self, url: str, protocol: str = "http", model: str = "jei", timeout_s: float = 30.0):
        if protocol == "http":
            import tritonclient.http as mod

            self._client = mod.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        elif protocol == "grpc":
            import tritonclient.grpc as mod

            self._client = mod.InferenceServerClient(url)
        else:
            raise ValueError(f"protocol must be http or grpc, got {protocol!r}")
        self._mod = mod
        self.protocol = protocol
        self.model = model
        self.timeout_s = timeout_s

    def infer(self, x: np.ndarray, raw: bool = False, datatype: Optional[str] = None,
              name: Optional[str] = None) -> Dict[str, np.ndarray]:
        """Send ``x`` (``[b, C, H, W]``) as one request; every output the model returned.

        ``datatype`` / ``name`` override the declared type and input name (to send bad requests).
        Raises ``tritonclient.utils.InferenceServerException`` on an error response.
        """
        name = name or (RAW_INPUT if raw else INPUT)
        dtype = datatype or "FP32"
        inp = self._mod.InferInput(name, list(x.shape), dtype)
        inp.set_data_from_numpy(x)
        if self.protocol == "grpc":
            res = self._client.infer(self.model, [inp], client_timeout=self.timeout_s)
            outputs = [o.name for o in res.get_response().outputs]
        else:
            res = self._client.infer(self.model, [inp])
            outputs = [o["name"] for o in res.get_response()["outputs"]]
        return {k: res.as_numpy(k) for k in outputs}

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def mismatches(got: Dict[str, np.ndarray], want: Dict[str, np.ndarray], atol: float = 1e-6) -> List[str]:
    """What differs between a served answer and the runtime's (``Handler.run``) for the same rows."""
    problems = []
    for k in sorted(set(want) | set(got)):
        if k not in got or k not in want:
            problems.append(f"output {k} is {'missing' if k not in got else 'unexpected'}")
            continue
        a, b = np.asarray(got[k]), np.asarray(want[k])
        if a.shape != b.shape:
            problems.append(f"{k}: shape {list(a.shape)} != {list(b.shape)}")
        elif k in EXACT and not np.array_equal(a, b):
            problems.append(f"{k}: {int((a != b).sum())} value(s) differ")
        elif k in CLOSE and not np.allclose(a, b, rtol=0, atol=atol):
            problems.append(f"{k}: max |diff| {float(np.max(np.abs(a.astype(np.float64) - b))):.3g} > {atol:g}")
    return problems
