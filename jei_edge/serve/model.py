"""The Triton Python-backend model that runs a jei-edge bundle (``TritonPythonModel``).

A model repository written by ``jei_edge.serve.repository`` has ``<model>/1/model.py`` that
imports this class, so the serving logic lives in the package (tested) and the repository only
names it. Each model instance (``instance_group count``) is its own stub process with its own
``Runtime``; Triton's dynamic batcher gives ``execute`` a list of requests, which the ``Handler``
answers one by one (an error for a bad request, never for the requests batched with it).

Early-exit metrics, exported on Triton's own ``/metrics`` endpoint (Prometheus text format) next to
its ``nv_*`` metrics, all labelled ``model="<name>"``:

- ``jei_edge_samples_total{exit="k"}``: samples answered at exit k (the final head is the last k);
- ``jei_edge_cost_total``: sum of their realized cost, as a fraction of the full model's MACs, so
  ``jei_edge_cost_total / sum(jei_edge_samples_total)`` is the mean realized cost;
- ``jei_edge_rejected_requests_total``: requests answered with an error;
- ``jei_edge_executions_total`` and ``jei_edge_batch_rows_total``: batches run and their rows
  (the mean batch the dynamic batcher formed is their ratio);
- ``jei_edge_run_seconds_total``: time spent answering them in jei-edge (checks, ``Runtime.run``,
  splitting), the part of Triton's compute time that is not the Python backend's own handling.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Optional

from jei_edge.serve.handler import INPUT, RAW_INPUT, Handler, ModelSpec

PARAMETERS = ("bundle", "mode", "offsets", "use_deploy", "alpha", "backend_options")


def spec_from_parameters(name: str, params: Dict[str, str]) -> ModelSpec:
    """The ``ModelSpec`` stored in a config.pbtxt's ``parameters`` (``repository.config_text``)."""
    from jei_edge.runtime.output import parse_offsets

    offsets = parse_offsets(params.get("offsets") or None)
    alpha = params.get("alpha", "")
    return ModelSpec(name=name, mode=params.get("mode", "exit"),
                     offsets=tuple(offsets) if offsets is not None else None,
                     use_deploy=params.get("use_deploy", "true").lower() != "false",
                     alpha=float(alpha) if alpha else None)


def load_handler(model_dir: Path, name: str, params: Dict[str, str]) -> Handler:
    """Load the bundle named by ``params`` (relative to the model's directory) and its ``Handler``."""
    from jei_edge.runtime import Runtime
    from jei_edge.runtime.output import parse_backend_options

    bundle = Path(params.get("bundle", "1/model.jei"))
    if not bundle.is_absolute():
        bundle = model_dir / bundle
    options = [o for o in params.get("backend_options", "").split(",") if o.strip()]
    rt = Runtime.load(bundle, device="cpu", **parse_backend_options(options))
    try:
        return Handler(rt, spec_from_parameters(name, params))
    except BaseException:
        rt.close()
        raise


class TritonPythonModel:
    """Triton's Python-backend interface: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: Dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # provided by the Python backend's stub

        self._pb = pb_utils
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.handler = load_handler(Path(args["model_repository"]), self.name, params)
        self._metrics()

    def _metrics(self) -> None:
        pb = self._pb
        labels = {"model": self.name}

        self._families = []  # a family must outlive its metrics (Triton refuses to update orphans)

        def counter(name: str, text: str):
            family = pb.MetricFamily(name=name, description=text, kind=pb.MetricFamily.COUNTER)
            self._families.append(family)
            return family

        samples = counter("jei_edge_samples_total", "Samples answered, by exit (early-exit index; last = final head)")
        self.m_exit = [samples.Metric(labels={**labels, "exit": str(k)}) for k in range(self.handler.rt.num_exits)]
        self.m_cost = counter("jei_edge_cost_total", "Sum of realized per-sample cost (fraction of the full "
                              "model's MACs); divide by the samples for the mean").Metric(labels=labels)
        self.m_rejected = counter("jei_edge_rejected_requests_total",
                                  "Requests answered with an error (bad input)").Metric(labels=labels)
        self.m_exec = counter("jei_edge_executions_total", "Batches run by the model").Metric(labels=labels)
        self.m_rows = counter("jei_edge_batch_rows_total", "Samples in the batches run").Metric(labels=labels)
        self.m_seconds = counter("jei_edge_run_seconds_total", "Seconds spent in jei-edge answering the batches "
                                 "(request checks, Runtime.run, splitting)").Metric(labels=labels)

    def execute(self, requests):
        pb = self._pb
        inputs = []
        for request in requests:
            got: Dict[str, Optional[object]] = {}
            for name in (INPUT, RAW_INPUT):
                t = pb.get_input_tensor_by_name(request, name)
                got[name] = t.as_numpy() if t is not None else None
            inputs.append(got)
        t = time.perf_counter()
        answers, stats = self.handler.handle(inputs)
        seconds = time.perf_counter() - t
        responses = []
        for answer in answers:
            if isinstance(answer, dict):
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(k, v) for k, v in answer.items()]))
            else:
                responses.append(pb.InferenceResponse(error=self._error(f"{self.name}: {answer}")))
        for k, n in enumerate(stats.exit_counts):
            if n:
                self.m_exit[k].increment(n)
        if stats.samples:
            self.m_cost.increment(stats.cost_sum)
            self.m_exec.increment(1)
            self.m_rows.increment(stats.samples)
        if stats.rejected:
            self.m_rejected.increment(stats.rejected)
        self.m_seconds.increment(seconds)
        return responses

    def _error(self, message: str):
        """A per-request error, with Triton's INVALID_ARG code (HTTP 400) where the backend has codes."""
        err = self._pb.TritonError
        code = getattr(err, "INVALID_ARG", None)
        return err(message, code) if code is not None else err(message)

    def finalize(self) -> None:
        handler = getattr(self, "handler", None)
        if handler is not None:
            handler.rt.close()
        for name in ("m_exit", "m_cost", "m_rejected", "m_exec", "m_rows", "m_seconds"):  # metrics before their families
            if hasattr(self, name):
                delattr(self, name)
        self._families = []
