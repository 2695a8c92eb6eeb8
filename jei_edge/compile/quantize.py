"""INT8: exit-aware calibration and explicit (Q/DQ) quantization of the stage graphs.

The INT8 design (docs/runtime.md, "INT8"):

- **Exit-aware**: stage s is calibrated on the hidden states of the calibration samples that
  actually reach it under the FP32 model (offsets 0), the distribution it will see, not on every
  sample. A stage reached by fewer than ``MIN_ROWS`` calibration rows is calibrated on all rows
  (said in the report).
- **Explicit quantization** (QuantizeLinear/DequantizeLinear pairs in the ONNX graph, per-channel
  symmetric int8 weights, no bias quantization), made with onnxruntime's static quantizer.
- **Only the backbone's blocks (and the stem, unless the recipe excludes it) are quantized**: the
  IMs, the gates, the softmaxes and the input guard stay FP32 (exit decisions hinge on them).
  Nodes are selected by the exporter's module scopes (``/stem``, ``/parts.*``, ``/blocks.*``).
  The default recipes exclude the stem too (the convolution reading the raw input): with it
  quantized the benchmark ResNet's exit decisions agreed with FP32 on 78.7% of the real held-out
  inputs, without it on 99.8% (measured).
- **Activations**: the recipe's ``activations``. ``u8`` (asymmetric uint8, the default for the
  CPU target) is what onnxruntime's CPU kernels run fast; measured on the 2-core build host
  (AVX-512 VNNI), a ResNet stage ran 1.7x faster than FP32 with u8 activations and 0.65-0.72x
  *slower* with symmetric int8 activations (ViT stage: 1.2-1.5x vs 0.83-0.95x). ``s8``
  (symmetric int8) is what TensorRT needs; TensorRT targets will use it.

- **Quantized edges** (``edges``): the hidden state crossing a stage edge is the QuantizeLinear
  output (``uint8``/``int8``), not FP32: stage k ends with ``Q(hidden, scale, zero_point)`` and
  its IM reads the dequantized edge, stage k+1 starts at the DequantizeLinear input and its
  quantized convolutions read the edge's integers directly. One scale and zero point per edge
  (the ones the quantizer calibrated for stage k+1's input; minmax of the rows reaching it when
  none), recorded on the manifest's ``hidden_out`` / ``hidden_in``. onnxruntime then fuses each
  stage as it fuses the plain graph (the residual Add + ReLU + Q into QLinearAdd, no FP32
  Add/ReLU and fewer layout transposes per edge), and compaction moves 4x fewer bytes.
  ``"auto"`` (the default on onnxruntime targets) quantizes the edges whose next stage already
  quantizes its input (a ResNet block's convolutions); an edge into a stage that reads it in
  FP32 (a ViT block starts with LayerNorm and a residual Add) stays FP32, since quantizing it
  would add a Q/DQ pair and an 8-bit residual stream and remove nothing. ``"all"`` quantizes
  every edge, ``"none"`` none (docs/runtime.md, "INT8", has the measurements).
- **Channels-last edges**: a quantized feature-map edge read by quantized convolutions is stored
  ``[N, H, W, C]`` (``channels_last`` on the manifest's specs). onnxruntime runs quantized
  convolutions channels-last and keeps a graph's inputs and outputs in the declared layout, so an
  NCHW edge cost two full transposes per stage (into the first convolution, out of the residual
  add); a channels-last edge cancels both against the graph's own ``Transpose``. The IM's global
  average pool then reads the edge's integers directly, as one ``MatMulInteger`` by a row of ones
  (exact int32 sums, one scale) instead of dequantizing the whole feature map to FP32 first.
  Measured (``benchmarks/stage_ab.py``, 2-core host): ResNet-18's stage 1 1.23x faster at batch
  1, 1.26x at 64; stages 1-4 of the benchmark CNNs 1.13-1.32x at batch 64.

Methods: ``minmax``, ``entropy``, ``percentile`` (recipes in ``calibration/*.toml``).
"""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from jei_edge._data import data_dir, is_file_name
from jei_edge._io import shorten
from jei_edge.bundle.manifest import QUANTIZED, Graph, Stage, TensorSpec
from jei_edge.errors import BuildError, InputError

MIN_ROWS = 16  # fewer reaching rows than this: calibrate the stage on every calibration row
QUANT_SCOPES = ("/parts.", "/blocks.")  # exporter scopes of the backbone's blocks
STEM_SCOPES = ("/stem/", "/stem.")  # and of its stem (quantized unless the recipe excludes "stem")
METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("u8", "s8")


@dataclass(frozen=True)
class Recipe:
    """A calibration recipe (``calibration/NAME.toml`` or a TOML file)."""

    name: str = "default"
    data: Optional[str] = None  # a --data source; None = the checkpoint's own
    samples: int = 512
    method: str = "minmax"
    percentile: float = 99.99
    activations: str = "u8"
    exclude: Tuple[str, ...] = ("gate", "im", "stem")
    # op types quantized: the compute-heavy ones, and ReLU so that the quantizer folds it into the
    # preceding convolution's output range (onnxruntime then runs QLinearConv -> QLinearConv; with
    # ReLU left FP32 its optimized graph kept a DequantizeLinear -> QuantizeLinear requantization
    # per block: ResNet-18 stages 1-3 ran 1.10-1.11x faster at batch 1 without it, measured)
    ops: Tuple[str, ...] = ("Conv", "MatMul", "Gemm", "Relu")
    source: str = ""

    def check(self) -> "Recipe":
        """Check every field's type and value; one ``InputError`` names the recipe (its file) and the key."""
        import math

        where = f"calibration recipe '{self.source or self.name}'"

        def bad(key: str, problem: str, value) -> InputError:
            from jei_edge._io import shorten

            return InputError(f"{where}: {key} {problem}, got {shorten(repr(value), 80)}", hint=RECIPE_HINT)

        def text(key: str, value, optional: bool = False) -> None:
            if optional and value is None:
                return
            if not isinstance(value, str) or not value.strip():
                raise bad(key, "must be a non-empty string", value)

        def strings(key: str, value, allowed=None, allow_empty: bool = True) -> None:
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise bad(key, "must be a list of strings" + (f" from {list(allowed)}" if allowed else ""), value)
            if not value and not allow_empty:
                raise bad(key, "must list at least one entry", value)

        text("name", self.name)
        text("data", self.data, optional=True)
        if isinstance(self.samples, bool) or not isinstance(self.samples, int):
            raise bad("samples", f"must be an integer in 1..{MAX_SAMPLES:,}", self.samples)
        if not 1 <= self.samples <= MAX_SAMPLES:
            raise bad("samples", f"must be in 1..{MAX_SAMPLES:,}", self.samples)
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise bad("method", f"must be one of {list(METHODS)}", self.method)
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
            raise bad("percentile", "must be a number in (0, 100]", p)
        if not 0 < p <= 100:
            raise bad("percentile", "must be in (0, 100]", p)
        if not isinstance(self.activations, str) or self.activations not in ACTIVATIONS:
            raise bad("activations", f"must be one of {list(ACTIVATIONS)}", self.activations)
        strings("exclude", self.exclude, EXCLUDABLE)
        unknown = sorted(set(self.exclude) - set(EXCLUDABLE))
        if unknown:
            raise bad("exclude", f"may list {list(EXCLUDABLE)} only", unknown)
        strings("ops", self.ops, allow_empty=False)
        odd = [o for o in self.ops if not o.isidentifier()]
        if odd:
            raise bad("ops", "must be ONNX op types (e.g. Conv, MatMul, Gemm)", odd)
        return self


RECIPE_KEYS = ("name", "data", "samples", "method", "percentile", "activations", "exclude", "ops")
EXCLUDABLE = ("gate", "im", "stem")
MAX_SAMPLES = 1_000_000
RECIPE_HINT = "see calibration/default.toml for the keys and their types"


def load_recipe(name_or_path: str = "default") -> Recipe:
    """A recipe by name (``calibration/NAME.toml``) or from a ``.toml`` path; every problem (a
    missing file, bad TOML, an unknown key, a value of the wrong type) is one ``InputError`` naming
    the file and the key."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    from jei_edge._io import shorten

    name_or_path = str(name_or_path)
    path = Path(name_or_path)
    known = sorted(p.stem for p in data_dir("calibration").glob("*.toml"))
    if is_file_name(name_or_path):
        if not path.exists():
            raise InputError(f"calibration recipe file '{path}' not found",
                             hint=f"check the path, or use a built-in recipe: {', '.join(known)}")
        if not path.is_file():
            raise InputError(f"calibration recipe '{path}' is not a file", hint="give a .toml file")
    else:
        path = data_dir("calibration") / f"{name_or_path}.toml"
        if not path.is_file():
            raise InputError(f"calibration recipe '{name_or_path}' not found",
                             hint=f"built-in recipes: {', '.join(known) or '(none)'}, or a .toml file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"calibration recipe '{path}' cannot be read: {shorten(exc, 160)}",
                         hint="it must be a UTF-8 TOML file; " + RECIPE_HINT) from None
    unknown = sorted(set(raw) - set(RECIPE_KEYS))
    if unknown:
        raise InputError(f"calibration recipe '{path}' has unknown keys {unknown}",
                         hint=f"known keys: {', '.join(RECIPE_KEYS)}")
    fields = dict(raw)
    for key in ("exclude", "ops"):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(fields[key])
    fields.setdefault("name", path.stem)
    return Recipe(source=str(path), **fields).check()


def stage_inputs(model, x: np.ndarray, plans, batch: int = 256) -> Tuple[List[np.ndarray], List[int], np.ndarray]:
    """Exit-aware calibration inputs: for each planned stage, the FP32 input rows of the samples
    of ``x`` that reach it (offsets 0).

    Args:
        model: the JEIModel.
        x: ``[N, C, H, W]`` calibration inputs.
        plans: the ``StagePlan`` list.
        batch: rows per PyTorch pass.

    Returns:
        ``(inputs per stage, rows reaching each stage, exit level of every row)``.
    """
    import torch

    from jei_edge.model.jei import exit_decisions

    levels = exit_decisions(model, x, batch=batch).levels
    h = x
    inputs, reach = [], []
    with torch.no_grad():
        for plan in plans:
            rows = levels >= plan.exits[0]
            reach.append(int(rows.sum()))
            inputs.append(np.ascontiguousarray(h[rows] if rows.sum() >= MIN_ROWS else h))
            if plan.gated:
                module = model.stage(plan.exits[0], last_exit=plan.exits[-1]).eval()
                h = np.concatenate([module(torch.from_numpy(np.ascontiguousarray(h[i:i + batch])))[0].numpy()
                                    for i in range(0, len(h), batch)])
    return inputs, reach, levels


def quantizable_nodes(path: Path, exclude: Sequence[str] = ("gate", "im", "stem"),
                      ops: Sequence[str] = Recipe.ops) -> Tuple[List[str], List[str]]:
    """``(quantize, exclude)`` node names of an exported graph: the ``ops`` nodes of the blocks
    (plus the stem, IMs, gates when the recipe does not exclude them) vs the rest."""
    import onnx

    scopes = (QUANT_SCOPES + (() if "stem" in exclude else STEM_SCOPES) + (() if "im" in exclude else ("/outs.",))
              + (() if "gate" in exclude else ("/gates.",)))
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    # a weight may reach its MatMul through a Transpose/Cast of an initializer (exporter constants)
    weights |= {n.output[0] for n in graph.node if n.op_type in ("Transpose", "Cast", "Identity") and n.input[0] in weights}

    def wanted(node) -> bool:
        if not node.name.startswith(scopes) or node.op_type not in ops:
            return False
        # activation x activation products (attention's Q.K^T and A.V) stay FP32: with them
        # quantized the benchmark ViT's exit decisions agreed with FP32 on 90.2% of the parity
        # inputs, without them on 97.0% (measured)
        return node.op_type != "MatMul" or any(i in weights for i in node.input)

    keep = [n.name for n in graph.node if wanted(n)]
    kept = set(keep)
    return keep, [n.name for n in graph.node if n.name not in kept]


def quantize_graph(src: Path, dst: Path, input_name: str, calib: np.ndarray, recipe: Recipe,
                   batch: int = 64) -> Dict:
    """Quantize ``src`` (an FP32 stage or plain graph) into ``dst`` with Q/DQ nodes, calibrated on ``calib``."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calib) == 0:
        raise BuildError(f"INT8 calibration of '{src.name}': the calibration set is empty",
                         hint="give calibration data (--data or the recipe's data) with at least one sample")
    keep, exclude = quantizable_nodes(src, recipe.exclude, recipe.ops)
    if not keep:
        raise BuildError(f"INT8: graph '{src.name}' has no stem/block nodes to quantize (exporter scopes changed?)")

    # equal-sized batches (the last one topped up with the first rows): onnxruntime's histogram
    # calibrators (entropy, percentile) fail on a smaller last batch
    batch = min(batch, len(calib))
    n_batches = -(-len(calib) // batch)
    rows = np.resize(calib, (n_batches * batch,) + calib.shape[1:]).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{input_name: np.ascontiguousarray(rows[i:i + batch])} for i in range(0, len(rows), batch)])

        def get_next(self):
            return next(self._it, None)

    pre = dst.with_name(dst.stem + ".pre.onnx")
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[recipe.method]
    u8 = recipe.activations == "u8"
    # DedicatedQDQPair: a Q/DQ pair per quantized consumer, so FP32 consumers of a tensor (the input
    # guard reading x) keep the raw values: a shared pair would clamp NaN/inf to finite numbers
    extra = {"ActivationSymmetric": not u8, "WeightSymmetric": True, "QuantizeBias": False, "DedicatedQDQPair": True}
    if recipe.method == "percentile":
        extra["CalibPercentile"] = float(recipe.percentile)
    try:
        quant_pre_process(str(src), str(pre), skip_optimization=False)
        with contextlib.redirect_stdout(io.StringIO()):  # the quantizer prints; keep --json output clean
            quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8 if u8 else QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=method, nodes_to_exclude=exclude, op_types_to_quantize=list(recipe.ops),
                            extra_options=extra)
    except Exception as exc:  # onnxruntime.quantization raises plain exceptions of many kinds
        raise BuildError(f"INT8 quantization of '{src.name}' failed: {shorten(str(exc).splitlines()[0], 300)}") from exc
    finally:
        pre.unlink(missing_ok=True)
        for extra_file in dst.parent.glob(dst.stem + "*augmented*"):
            extra_file.unlink(missing_ok=True)
    rewired = _raw_inputs_for_fp32_nodes(dst, set(exclude))
    return {"calibration_rows": int(len(calib)), "quantized_nodes": len(keep), "fp32_nodes": len(exclude),
            "fp32_nodes_reading_raw_input": rewired}


def _raw_inputs_for_fp32_nodes(path: Path, fp32_nodes: set) -> int:
    """onnxruntime's quantizer routes *every* consumer of a quantized graph input through its
    Q/DQ pair, FP32 nodes included. For the input guard that would clamp NaN/inf to finite values
    and blind it (the runtime's load-time probe caught exactly that), so excluded nodes get the raw
    graph input back. Returns how many inputs were rewired."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    inputs = {i.name for i in graph.input}
    q_of = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inputs}
    raw_of = {n.output[0]: q_of[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in q_of}
    count = 0
    for node in graph.node:
        if node.name in fp32_nodes:
            for i, name in enumerate(node.input):
                if name in raw_of:
                    node.input[i] = raw_of[name]
                    count += 1
    if count:
        onnx.save(model, str(path))
    return count


def quantize_bundle_graphs(model, plans, stages: Sequence[Stage], plain: Graph, tmp: Path, x_calib: np.ndarray,
                           recipe: Recipe, progress: Optional[Callable[[str], None]] = None,
                           edges: str = "none", fallback_floor: Optional[float] = None,
                           ort_options: Optional[Dict] = None,
                           fallback_inputs: Optional[Tuple[np.ndarray, str]] = None) -> Tuple[List[Stage], Dict]:
    """Replace the FP32 stage graphs (and the plain backbone) in ``tmp`` by calibrated INT8 ones.

    Args:
        model: the JEIModel the graphs were exported from.
        plans: the ``StagePlan`` list (``stages`` are their exports).
        stages: the exported stages (``jei_edge.bundle.Stage``).
        plain: the exported plain backbone.
        tmp: the bundle's staging directory.
        x_calib: calibration inputs.
        recipe: the calibration recipe.
        progress: called with a short message per graph.
        edges: which stage edges carry quantized hidden states: ``none``, ``auto``, ``all``
            (module docstring).
        fallback_floor: keep the fewest stages in FP32 that hold this agreement floor with the
            FP32 model's exit decisions (``jei_edge.compile.fallback``; the search aims at
            ``search_target`` of it); None: every stage INT8.
        ort_options: onnxruntime settings of the fallback search's sessions.
        fallback_inputs: ``(inputs, description)`` the search chooses on; None: ``x_calib``.

    Returns:
        ``(stages, record)``: the stages (with quantized ``hidden_out`` / ``hidden_in`` specs on
        quantized edges) and the quantization record (manifest ``quantization``, build report).
    """
    say = progress or (lambda m: None)
    if len(x_calib) == 0:
        raise BuildError("INT8 calibration set is empty", hint="give calibration data with at least one sample")
    inputs, reach, levels = stage_inputs(model, x_calib, plans)
    report = {"recipe": recipe.name, "recipe_file": recipe.source, "method": recipe.method,
              "activations": "uint8 asymmetric" if recipe.activations == "u8" else "int8 symmetric",
              "weights": "int8 symmetric per channel", "bias": "fp32",
              "fp32": ["IMs", "gates", "softmax", "input guard"] + (["stem"] if "stem" in recipe.exclude else []),
              "calibration_samples": int(len(x_calib)),
              "calibration_exit_histogram": np.bincount(levels, minlength=len(model.stage_ranges())).tolist(),
              "stages": []}
    quantized = []
    for plan, stage, calib, n_reach in zip(plans, stages, inputs, reach):
        say(f"int8: calibrating stage {plan.index} on {len(calib)} rows ({n_reach} of {len(x_calib)} reach it)")
        path = tmp / stage.file
        quantized.append(path.with_name(path.stem + ".int8.onnx"))
        info = quantize_graph(path, quantized[-1], stage.input.name, calib, recipe)
        info.update({"stage": plan.index, "rows_reaching": n_reach, "precision": "int8",
                     "calibrated_on": "reaching rows" if n_reach >= MIN_ROWS else f"all rows (fewer than {MIN_ROWS} reach it)"})
        report["stages"].append(info)
    keep_fp32: set = set()
    report["fallback"] = {"mode": "off"}
    if fallback_floor is not None:
        from jei_edge.backends.onnxruntime import OrtSettings
        from jei_edge.compile.fallback import MixedStages, choose_fp32_stages, search_target
        from jei_edge.model.jei import exit_decisions

        x_sel, what = fallback_inputs or (x_calib, "")  # "": choose_fp32_stages says "N calibration inputs"
        ref = levels if fallback_inputs is None else exit_decisions(model, x_sel).levels
        mixed = MixedStages([tmp / s.file for s in stages], quantized, [s.input.name for s in stages],
                            OrtSettings.from_options(ort_options or {}))
        report["fallback"] = choose_fp32_stages(mixed, [s.macs for s in stages], x_sel, ref,
                                                search_target(fallback_floor, len(x_sel)), progress, what=what)
        report["fallback"]["floor"] = float(fallback_floor)
        del mixed
        keep_fp32 = set(report["fallback"]["fp32_stages"])
    for k, (stage, q) in enumerate(zip(stages, quantized)):
        if k in keep_fp32:
            q.unlink()
            info = report["stages"][k]
            info.update(precision="fp32 (fallback)", fp32_nodes=info["quantized_nodes"] + info["fp32_nodes"],
                        quantized_nodes=0)
        else:
            q.replace(tmp / stage.file)
    if keep_fp32:
        report["fp32"].append("stage" + ("s " if len(keep_fp32) > 1 else " ") + ", ".join(map(str, sorted(keep_fp32)))
                              + " (fallback)")
    say(f"int8: calibrating the plain backbone on {len(x_calib)} rows")
    report["plain"] = _quantize_in_place(tmp / plain.file, plain.inputs[0].name, x_calib, recipe)
    stages = list(stages)
    report["edges"] = "fp32"
    if edges != "none" and len(stages) > 1:
        stages, record = quantize_edges(tmp, stages, inputs, recipe.activations, every=edges == "all")
        report["edges"] = record
        n = sum(e["dtype"] != "float32" for e in record)
        say(f"int8: {n} of {len(record)} stage edges carry {EDGE_TYPES[recipe.activations]} hidden states")
    return stages, report


class CandidateQuantizer:
    """The INT8 form of ``--plan auto``'s candidate stages (``jei_edge.compile.planning.Candidates``),
    so that an INT8 bundle is planned on the stage times it will have: each candidate quantized
    with the build's recipe, calibrated exit-aware (on the rows reaching its first exit, as the
    build's own stages; ``rows`` of them, since only the graph's speed is used), and its stage
    edges written as the build writes them (``edges``: ``auto``, ``all`` or ``none``, module
    docstring): a CNN's candidates then read and write uint8 channels-last hidden states, whose
    boundaries cost much less than float ones."""

    def __init__(self, model, x_calib: np.ndarray, costs: Dict, recipe: Recipe, edges: str, rows: int = 64):
        self.recipe, self.edges = recipe, edges
        self._source = (model, x_calib[:4 * rows], costs, rows)
        self._calib: Optional[List[np.ndarray]] = None
        self.specs: Dict[int, TensorSpec] = {}
        kind = {"none": "float stage edges", "all": "every stage edge quantized",
                "auto": "stage edges quantized where the next stage quantizes its input"}[edges]
        self.description = f"int8 (recipe '{recipe.name}', {kind})"

    @property
    def calib(self) -> List[np.ndarray]:
        """The calibration rows entering each exit (computed when the first candidate needs them)."""
        if self._calib is None:
            from jei_edge.compile.plan import plan_stages

            model, x, costs, rows = self._source
            inputs, _, _ = stage_inputs(model, x, plan_stages(model, costs))
            self._calib = [np.ascontiguousarray(v[:rows]) for v in inputs]
        return self._calib

    def graph(self, path: Path, a: int, input_name: str) -> None:
        """Candidate ``a..`` at ``path`` (exported FP32) becomes its INT8 graph, in place."""
        q = path.with_name(path.stem + ".int8.onnx")
        quantize_graph(path, q, input_name, self.calib[a], self.recipe)
        q.replace(path)

    def edges_of(self, paths: Dict[Tuple[int, int], Path]) -> None:
        """Rewrite every candidate's stage edges in place (``paths[(a, b)]``: the INT8 candidates;
        each edge's parameters are those of the candidates starting at the exit it enters, which
        all quantize that input alike: same rows, same tensor)."""
        if self.edges == "none":
            return
        n = 1 + max(b for _, b in paths)
        for e in range(1, n):
            spec = edge_spec(paths[(e, e)], "hidden_in", self.calib[e], self.recipe.activations,
                             self.edges == "all", tuple(self.calib[e].shape[1:]))
            if spec is not None:
                self.specs[e] = spec
        for (a, b), path in paths.items():
            if a in self.specs:
                rewrite_edge(self.specs[a], None, "", path, "hidden_in")
            if b + 1 in self.specs:
                rewrite_edge(self.specs[b + 1], path, "hidden_out", None, "")

    def edge_rows(self, a: int, x: np.ndarray) -> np.ndarray:
        """FP32 hidden rows entering exit ``a`` as the candidates starting there read them."""
        spec = self.specs.get(a)
        return x if spec is None else quantize_rows(x, spec)


def _quantize_in_place(path: Path, input_name: str, calib: np.ndarray, recipe: Recipe) -> Dict:
    q = path.with_name(path.stem + ".int8.onnx")
    info = quantize_graph(path, q, input_name, calib, recipe)
    q.replace(path)
    return info


# -- quantized stage edges ------------------------------------------------------------------------
EDGE_TYPES = {"u8": "uint8", "s8": "int8"}


def edge_params(path: Path, input_name: str, calib: np.ndarray, activations: str) -> Tuple[float, int, str, bool]:
    """``(scale, zero_point, dtype, own)`` of the edge into the graph at ``path``: the quantizer's
    own parameters for its input (the QuantizeLinear nodes reading it; ``own`` True), so that its
    quantized consumers read the edge's integers unchanged; else (no quantized consumer: a ViT
    block starts with LayerNorm) minmax of ``calib``, the rows reaching the stage."""
    import onnx
    from onnx import numpy_helper

    dtype = EDGE_TYPES[activations]
    graph = onnx.load(str(path), load_external_data=False).graph
    init = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == input_name and len(node.input) == 3:
            if node.input[1] in init and node.input[2] in init:
                scale = numpy_helper.to_array(init[node.input[1]])
                zp = numpy_helper.to_array(init[node.input[2]])
                if scale.size == 1 and zp.size == 1 and zp.dtype == np.dtype(dtype):
                    return float(scale.reshape(())), int(zp.reshape(())), dtype, True
    return (*minmax_params(calib, dtype), dtype, False)


def edge_spec(path: Path, input_name: str, calib: np.ndarray, activations: str, every: bool,
              shape: Tuple[int, ...]) -> Optional[TensorSpec]:
    """The quantized form of the edge into the graph at ``path`` (``shape``: the hidden state's
    per-row shape in the model's layout), or None where it stays FP32: quantized where that graph
    quantizes its input itself (or ``every``), channels-last ``[H, W, C]`` when a feature map
    meets quantized convolutions (module docstring)."""
    scale, zp, dtype, own = edge_params(path, input_name, calib, activations)
    if not (own or every):
        return None
    hwc = (shape[1], shape[2], shape[0]) if own and len(shape) == 3 else None
    return TensorSpec(input_name, hwc or tuple(shape), dtype, scale, zp, hwc is not None)


def rewrite_edge(spec: TensorSpec, out_path: Optional[Path], out_name: str, in_path: Optional[Path],
                 in_name: str) -> Tuple[bool, int]:
    """Quantize an edge: the graph at ``out_path`` writes it (output ``out_name``), the one at
    ``in_path`` reads it (input ``in_name``); either may be None. Returns ``(the IM pools the
    integers, QuantizeLinear nodes dropped)``."""
    hwc = spec.shape if spec.channels_last else None
    pooled = out_path is not None and _quantize_graph_output(out_path, out_name, spec.scale, spec.zero_point,
                                                             spec.dtype, channels_last=hwc)
    removed = 0 if in_path is None else _quantize_graph_input(in_path, in_name, spec.scale, spec.zero_point,
                                                              spec.dtype, channels_last=hwc)
    return bool(pooled), removed


def minmax_params(x: np.ndarray, dtype: str) -> Tuple[float, int]:
    """onnxruntime's minmax rule (range widened to hold 0): uint8 asymmetric, int8 symmetric."""
    lo, hi = min(float(np.min(x)), 0.0) if x.size else 0.0, max(float(np.max(x)), 0.0) if x.size else 0.0
    if dtype == "uint8":
        scale = (hi - lo) / 255.0 or 1.0
        return float(np.float32(scale)), int(np.clip(round(-lo / scale), 0, 255))
    return float(np.float32(max(abs(lo), abs(hi)) / 127.0 or 1.0)), 0


def quantize_rows(x: np.ndarray, spec) -> np.ndarray:
    """Real values in the model's layout -> the edge's integers (QuantizeLinear: round half to
    even, saturate), ``[N, C, H, W]`` -> ``[N, H, W, C]`` for a channels-last edge."""
    lo, hi = QUANTIZED[spec.dtype]
    q = np.rint(np.asarray(x, dtype=np.float32) / np.float32(spec.scale)) + spec.zero_point
    q = np.clip(q, lo, hi).astype(spec.dtype)
    return np.ascontiguousarray(q.transpose(0, 2, 3, 1)) if spec.channels_last else q


def dequantize_rows(q: np.ndarray, spec) -> np.ndarray:
    """The edge's integers -> real values (DequantizeLinear) in the model's layout."""
    if spec.channels_last:
        q = q.transpose(0, 3, 1, 2)
    return np.ascontiguousarray((q.astype(np.int32) - spec.zero_point) * np.float32(spec.scale), dtype=np.float32)


def quantize_edges(tmp: Path, stages: Sequence[Stage], inputs: Sequence[np.ndarray],
                   activations: str, every: bool = False) -> Tuple[List[Stage], List[Dict]]:
    """Rewrite stage edges k -> k+1 to carry the quantized hidden state (module docstring).

    Args:
        tmp: the staging directory holding the (already quantized) stage graphs.
        stages: the stages; ``inputs``: the calibration rows of each stage (``stage_inputs``).
        activations: the recipe's ``u8`` / ``s8``.
        every: every edge; else only those whose next stage quantizes its input itself.

    Returns:
        ``(stages with quantized hidden specs, one record per edge)``.
    """
    import dataclasses

    from jei_edge.compile.export import check_onnx

    out, edges = list(stages), []
    for k in range(len(stages) - 1):
        a, b = out[k], out[k + 1]
        edge = edge_spec(tmp / b.file, b.input.name, inputs[k + 1], activations, every, a.hidden.shape)
        if edge is None:
            edges.append({"edge": f"{k}->{k + 1}", "dtype": "float32",
                          "why": f"stage {k + 1} reads its input in FP32 only: nothing to save"})
            continue
        pooled, removed = rewrite_edge(edge, tmp / a.file, a.hidden.name, tmp / b.file, b.input.name)
        spec = dict(dtype=edge.dtype, scale=edge.scale, zero_point=edge.zero_point, shape=edge.shape,
                    channels_last=edge.channels_last)
        out[k] = a = dataclasses.replace(a, outputs=tuple(dataclasses.replace(o, **spec) if o.name == a.hidden.name else o
                                                          for o in a.outputs))
        out[k + 1] = b = dataclasses.replace(b, inputs=(dataclasses.replace(b.input, **spec),))
        for st in (a, b):
            check_onnx(tmp / st.file, f"stage {st.index} (quantized edge)", st.input.name, [o.name for o in st.outputs])
        edges.append({"edge": f"{k}->{k + 1}", "dtype": edge.dtype, "scale": edge.scale, "zero_point": edge.zero_point,
                      "layout": "channels_last" if edge.channels_last else "model",
                      "im_pool": "integer" if pooled else "fp32",
                      "quantize_nodes_removed": removed})
    return out, edges


_ONNX_TYPES = {"uint8": 2, "int8": 3}  # onnx.TensorProto.UINT8 / INT8


def _qparams(graph, prefix: str, scale: float, zp: int, dtype: str) -> Tuple[str, str]:
    from onnx import numpy_helper

    s_name, z_name = f"{prefix}_edge_scale", f"{prefix}_edge_zero_point"
    graph.initializer.extend([numpy_helper.from_array(np.array(scale, dtype=np.float32), s_name),
                              numpy_helper.from_array(np.array(zp, dtype=dtype), z_name)])
    return s_name, z_name


def _quantize_graph_output(path: Path, name: str, scale: float, zp: int, dtype: str,
                           channels_last: Optional[Tuple[int, int, int]] = None) -> bool:
    """Graph output ``name`` becomes ``QuantizeLinear(name)``; the graph's own readers of the FP32
    value (the IM) read ``DequantizeLinear`` of it, the value the next stage sees, which also
    leaves the FP32 value one reader so onnxruntime can fuse it into the quantized op before it.

    ``channels_last`` (the edge's per-row ``(H, W, C)``): the output is the quantized value
    transposed to ``[N, H, W, C]``, and an IM that starts with a global average pool
    (``ReduceMean`` over H and W) pools the edge's integers (``_integer_mean_pool``). Returns
    whether it did."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    fp32, dq = f"{name}_fp32", f"{name}_dequantized"
    q = f"{name}_nchw" if channels_last is not None else name
    at = None
    for i, node in enumerate(graph.node):
        for j, o in enumerate(node.output):
            if o == name:
                node.output[j], at = fp32, i
        for j, x in enumerate(node.input):
            if x == name:
                node.input[j] = dq
    if at is None:
        raise BuildError(f"INT8 quantized edge: no node of '{path.name}' writes '{name}'")
    s_name, z_name = _qparams(graph, name, scale, zp, dtype)
    graph.node.insert(at + 1, onnx.helper.make_node("QuantizeLinear", [fp32, s_name, z_name], [q],
                                                    name=f"{name}_edge_QuantizeLinear"))
    graph.node.insert(at + 2, onnx.helper.make_node("DequantizeLinear", [q, s_name, z_name], [dq],
                                                    name=f"{name}_edge_DequantizeLinear"))
    pooled = False
    if channels_last is not None:
        graph.node.insert(at + 2, onnx.helper.make_node("Transpose", [q], [name], perm=[0, 2, 3, 1],
                                                        name=f"{name}_edge_channels_last"))
        _drop_value_info(graph, name)
        (out,) = [o for o in graph.output if o.name == name]
        _permute_dims(out, (0, 2, 3, 1))
        h, w, _ = channels_last
        readers = [n for n in graph.node if dq in n.input]
        keep = [_spatial_mean(n, graph) for n in readers]
        # int32 sums of |q - zero_point| <= 255 over H*W positions must not overflow
        if readers and all(k is not None for k in keep) and h * w * 255 < 2 ** 31:
            for n, k in zip(readers, keep):
                _integer_mean_pool(graph, n, name, channels_last, scale, z_name, k)
            pooled = True
    for o in graph.output:
        if o.name == name:
            o.type.tensor_type.elem_type = _ONNX_TYPES[dtype]
    _prune(graph)
    onnx.save(model, str(path))
    return pooled


def _permute_dims(value_info, perm: Sequence[int]) -> None:
    """Reorder a graph input's / output's declared dimensions (``[N, C, H, W]`` <-> ``[N, H, W, C]``)."""
    import onnx

    dims = value_info.type.tensor_type.shape.dim
    old = [onnx.TensorShapeProto.Dimension() for _ in dims]
    for d, src in zip(old, dims):
        d.CopyFrom(src)
    for d, i in zip(dims, perm):
        d.CopyFrom(old[i])


def _drop_value_info(graph, name: str) -> None:
    """Forget a tensor's inferred shape (its layout is about to change)."""
    for v in [v for v in graph.value_info if v.name == name]:
        graph.value_info.remove(v)


def _spatial_mean(node, graph) -> Optional[bool]:
    """``keepdims`` of a ``ReduceMean`` over exactly the H and W axes of an ``[N, C, H, W]`` value
    (axes as an attribute before opset 18, as a constant input from 18 on); None for any other node."""
    from onnx import numpy_helper

    if node.op_type != "ReduceMean" or not 1 <= len(node.input) <= 2:
        return None
    attrs = {a.name: a for a in node.attribute}
    if len(node.input) == 2:
        init = [t for t in graph.initializer if t.name == node.input[1]]
        axes = numpy_helper.to_array(init[0]).ravel().tolist() if init else None
    else:
        axes = list(attrs["axes"].ints) if "axes" in attrs else None
    if axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
        return None
    return bool(attrs["keepdims"].i) if "keepdims" in attrs else True


def _integer_mean_pool(graph, node, src: str, hwc: Tuple[int, int, int], scale: float, zp_name: str,
                       keepdims: bool) -> None:
    """Replace ``ReduceMean(DequantizeLinear(edge))`` over H, W by a pool of the channels-last
    edge's integers: ``MatMulInteger(ones[1, HW], edge[N, HW, C], zero_point)`` gives each
    channel's exact int32 sum of ``q - zero_point``; one ``Cast`` and one ``Mul`` by
    ``scale / HW`` give the mean, in the ReduceMean's output shape."""
    import onnx
    from onnx import numpy_helper

    h, w, c = hwc
    p = node.output[0]
    graph.initializer.extend([
        numpy_helper.from_array(np.ones((1, h * w), np.uint8), f"{p}_ones"),
        numpy_helper.from_array(np.array([0, h * w, c], np.int64), f"{p}_rows"),
        numpy_helper.from_array(np.array([0, c, 1, 1] if keepdims else [0, c], np.int64), f"{p}_shape"),
        numpy_helper.from_array(np.array(np.float32(scale) / np.float32(h * w), np.float32), f"{p}_scale")])
    at = list(graph.node).index(node)
    graph.node.remove(node)
    make = onnx.helper.make_node
    for i, n in enumerate([
            make("Reshape", [src, f"{p}_rows"], [f"{p}_hw_c"], name=f"{p}_int_pool_reshape"),
            make("MatMulInteger", [f"{p}_ones", f"{p}_hw_c", "", zp_name], [f"{p}_sum"], name=f"{p}_int_pool_sum"),
            make("Cast", [f"{p}_sum"], [f"{p}_sum_f"], to=onnx.TensorProto.FLOAT, name=f"{p}_int_pool_cast"),
            make("Mul", [f"{p}_sum_f", f"{p}_scale"], [f"{p}_mean"], name=f"{p}_int_pool_scale"),
            make("Reshape", [f"{p}_mean", f"{p}_shape"], [p], name=f"{p}_int_pool_out")]):
        graph.node.insert(at + i, n)


def _quantize_graph_input(path: Path, name: str, scale: float, zp: int, dtype: str,
                          channels_last: Optional[Tuple[int, int, int]] = None) -> int:
    """Graph input ``name`` becomes the quantized edge: its readers read ``DequantizeLinear(name)``,
    and every QuantizeLinear of that value with the edge's own parameters is dropped (its readers
    read ``name`` itself); ``channels_last`` (the edge's per-row ``(H, W, C)``): the input is
    ``[N, H, W, C]`` and all of that reads its ``Transpose`` to ``[N, C, H, W]`` instead
    (onnxruntime cancels it against its own layout change). Returns how many QuantizeLinear nodes
    were dropped."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    dq = f"{name}_dequantized"
    src = f"{name}_nchw" if channels_last is not None else name  # the edge's integers in the model's layout
    for node in graph.node:
        for j, x in enumerate(node.input):
            if x == name:
                node.input[j] = dq
    s_name, z_name = _qparams(graph, name, scale, zp, dtype)
    graph.node.insert(0, onnx.helper.make_node("DequantizeLinear", [src, s_name, z_name], [dq],
                                               name=f"{name}_edge_DequantizeLinear"))
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    same = set()
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == dq and len(node.input) == 3:
            s, z = init.get(node.input[1]), init.get(node.input[2])
            if (s is not None and z is not None and s.size == 1 and z.size == 1 and z.dtype == np.dtype(dtype)
                    and np.float32(s.reshape(())) == np.float32(scale) and int(z.reshape(())) == zp):
                same.add(node.output[0])
    if same:
        for node in graph.node:
            for j, x in enumerate(node.input):
                if x in same:
                    node.input[j] = src
    for i in graph.input:
        if i.name == name:
            i.type.tensor_type.elem_type = _ONNX_TYPES[dtype]
            if channels_last is not None:
                _permute_dims(i, (0, 2, 3, 1))
    if channels_last is not None:
        _drop_value_info(graph, name)
        graph.node.insert(0, onnx.helper.make_node("Transpose", [name], [src], perm=[0, 3, 1, 2],
                                                   name=f"{name}_edge_channels_first"))
    _prune(graph)
    onnx.save(model, str(path))
    return len(same)


def _prune(graph) -> None:
    """Drop nodes whose outputs nobody reads (and the initializers only they used)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {x for n in graph.node for x in n.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {x for n in graph.node for x in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
