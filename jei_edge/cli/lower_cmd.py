"""``jei-edge lower BUNDLE``: build a bundle's TensorRT engines where the toolchain is (torch-free)."""

from __future__ import annotations

import click

from jei_edge.cli.options import emit_json, json_option


@click.command(name="lower")
@click.argument("bundle", type=click.Path())
@click.option("--toolchain", type=click.Choice(["tensorrt", "tensorrt_rtx"]), default=None,
              help="Toolchain to build with (default: the bundle's target's). tensorrt_rtx can stand in for a "
                   "Jetson bundle's tensorrt to exercise this step on a host: its engines are labelled as "
                   "TensorRT-RTX engines and will not run on the board.")
@click.option("--compute-capability", "compute_capability", default=None, metavar="X.Y",
              help="The stand-in's compute capability (tensorrt_rtx for a Jetson bundle; default 8.6).")
@click.option("--force", is_flag=True, help="Rebuild engines the bundle already has.")
@click.option("--no-cache", "no_cache", is_flag=True,
              help="Do not read or write the engine cache ($JEI_EDGE_ENGINE_CACHE, default ~/.cache/jei-edge/engines).")
@json_option
def lower(bundle, toolchain, compute_capability, force, no_cache, as_json):
    """Build the engines of BUNDLE (a NAME.jei from `jei-edge build --target <jetson target>`) into it:
    one TensorRT engine per stage graph, at the bundle's precision and batch profile, for the GPU of
    this board. Run it on the board (JetPack's TensorRT and numpy are all it needs: no torch, no
    onnxruntime). The bundle is checked first, rebuilt in a staging copy, re-verified, and replaced
    atomically: a failure leaves it as it was.

    \b
    On a Jetson Orin with JetPack 6.2:
      jei-edge build model.pt --target orin-nx-jp6 -o model.jei     (on a host: graphs + plan)
      scp -r model.jei orin:                                        (then, on the board:)
      jei-edge lower model.jei
      jei-edge verify model.jei
    """
    from jei_edge.compile.lower import lower_existing

    say = None if as_json else (lambda msg: click.echo(msg, err=True))
    result = lower_existing(bundle, toolchain=toolchain, compute_capability=compute_capability, force=force,
                            progress=say, cache=False if no_cache else None)
    if as_json:
        emit_json(result)
        return
    low = result["lowering"]
    total = sum(r["bytes"] for r in low["stages"]) / 2**20
    built = sum(not r["cached"] for r in low["stages"])
    click.echo(f"lowered {result['bundle']}: {low['engines']} {low['backend']} {low['toolchain']} engines "
               f"({low['precision']}, compute capability {low['compute_capability']}, {total:.1f} MiB; "
               f"{built} built, {low['engines'] - built} from the cache)")
    for note in (result["note"], low.get("note")):
        if note:
            click.echo(f"  note: {note}")
