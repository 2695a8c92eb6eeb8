"""``jei-edge-run``: the standalone on-device entry point (numpy + a backend; no torch, no click).

Same run path as ``jei-edge run``, one JSON line per sample on stdout, so device applications can
pipe arrays in and parse results out::

    jei-edge-run model.jei images/ a.npy
    python producer.py | jei-edge-run model.jei -        # a stream of .npy arrays on stdin

Errors print one line on stderr (exit code 2); nothing else is written to stdout. Each array's
.npy header is checked before its data is read: object arrays, wrong shapes or dtypes, arrays with
no samples and arrays over 2 GiB ($JEI_EDGE_MAX_ARRAY_BYTES) are refused
(``jei_edge.runtime.inputs``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

from jei_edge.errors import InputError, JeiEdgeError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jei-edge-run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="the compiled bundle directory NAME.jei")
    p.add_argument("inputs", nargs="*", help=".npy/.npz files, images or folders; '-' or none: .npy arrays on stdin")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to execute (default: the device of the bundle's target)")
    p.add_argument("--mode", choices=["exit", "full"], default="exit", help="early exit (default) or every stage")
    p.add_argument("--offsets", default=None, help="per-gate threshold offsets, comma separated (one value: all gates)")
    p.add_argument("--alpha", type=float, default=None, help="conformal sets at this alpha (from the bundle's table)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per run (default: the bundle's max batch)")
    p.add_argument("--preprocessed", action="store_true", help="inputs are model inputs already (no normalisation)")
    p.add_argument("--probs", action="store_true", help="include the probability vector of each sample")
    p.add_argument("--summary", action="store_true", help="end with one JSON line {\"summary\": ...}")
    p.add_argument("--backend-opt", dest="backend_opts", action="append", default=[], metavar="KEY=VALUE",
                   help="backend setting, repeatable (CPU: onnxruntime settings such as intra_op_threads=1, "
                        "small_batch_rows=1 or row_workers=2; default: the bundle's target)")
    p.add_argument("--public-key", dest="public_key", default=os.environ.get("JEI_EDGE_PUBLIC_KEY") or None,
                   metavar="NAME.pub", help="refuse the bundle unless it is signed by this key and every file "
                                            "matches (default: $JEI_EDGE_PUBLIC_KEY when set)")
    return p


def _emit(rec) -> None:
    sys.stdout.write(json.dumps(rec, separators=(",", ":")) + "\n")


def run_stream(args) -> None:
    from jei_edge.runtime.inputs import concat, load_inputs, stream_npy
    from jei_edge.runtime.output import expand_offsets, parse_backend_options, parse_offsets, records, summary
    from jei_edge.runtime.runtime import Runtime

    if args.batch_size is not None and args.batch_size < 1:
        raise JeiEdgeError(f"--batch-size must be >= 1, got {args.batch_size}")
    rt = Runtime.load(args.bundle, device=args.device, max_batch=args.batch_size, public_key=args.public_key,
                      **parse_backend_options(args.backend_opts))
    offsets = expand_offsets(parse_offsets(args.offsets), rt.num_gates)
    if args.alpha is not None:
        rt.qhat(args.alpha)  # validate before any work
    sys.stderr.write(f"jei-edge-run: {rt.offsets_label(offsets) if args.mode == 'exit' else 'full mode'}\n")
    prep = rt.preprocessing
    files = [p for p in args.inputs if p != "-"]
    if files and len(files) != len(args.inputs):
        raise JeiEdgeError("use either input paths or '-' (stdin), not both")
    if files:
        batches = iter([load_inputs(files, prep, args.preprocessed, rt.class_names)])
    else:
        stdin = getattr(sys.stdin, "buffer", None)
        if stdin is None:  # started with stdin closed (e.g. `<&-` or a daemon without one)
            raise InputError("no input paths given and stdin is closed",
                             hint="pass .npy/.npz files, images or folders, or pipe .npy arrays into '-'")
        batches = stream_npy(stdin, prep, args.preprocessed)
    done = []
    seconds = 0.0
    for batch in batches:
        t = time.perf_counter()
        res = rt.run(batch.x, mode=args.mode, offsets=offsets)
        seconds += time.perf_counter() - t
        for r in records(res, rt, batch.sources, args.alpha, batch.y, args.probs):
            _emit(r)
        sys.stdout.flush()
        if args.summary:
            done.append((batch, res))
    if args.summary:
        from jei_edge.runtime.loop import Results

        if done:
            allb = concat([b for b, _ in done])
            res = Results.concat([r for _, r in done])
            _emit({"summary": {**summary(res, rt, args.mode, seconds, allb.y, args.alpha),
                               "offsets": rt.offsets_label(offsets)}})
        else:
            _emit({"summary": {"samples": 0}})


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        run_stream(args)
    except JeiEdgeError as exc:
        sys.stderr.write(f"error: {exc.message}\n")
        if exc.hint:
            sys.stderr.write(f"  hint: {exc.hint}\n")
        return exc.exit_code
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
