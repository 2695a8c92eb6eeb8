"""``jei-edge keygen`` and ``jei-edge sign``: Ed25519 signatures of bundles (``jei_edge.bundle.signing``)."""

from __future__ import annotations

import click

from jei_edge.cli.options import emit_json, json_option


@click.command(name="keygen")
@click.option("-o", "--output", required=True, metavar="NAME",
              help="Writes NAME.pem (private key, mode 0600: keep it where bundles are built) and NAME.pub "
                   "(public key: give it to the devices that run them).")
@json_option
def keygen(output, as_json):
    """Make an Ed25519 key pair for signing bundles."""
    from jei_edge.bundle.signing import keygen as make

    out = make(output)
    if as_json:
        emit_json(out)
    else:
        click.echo(f"wrote {out['private']} (private) and {out['public']} (public), key {out['fingerprint']}")


@click.command(name="sign")
@click.argument("bundle", type=click.Path())
@click.option("--key", "key", required=True, type=click.Path(), help="The private key (NAME.pem from keygen).")
@json_option
def sign(bundle, key, as_json):
    """Sign BUNDLE: checks its integrity, then writes manifest.sig, an Ed25519 signature of its
    manifest (which holds the sha256 of every other file). Devices that load it with
    --public-key NAME.pub (or $JEI_EDGE_PUBLIC_KEY) refuse it if any byte changes. Rewriting a
    bundle (lower, tune) drops the signature: sign it again afterwards.

    \b
      jei-edge keygen -o release
      jei-edge sign model.jei --key release.pem
      jei-edge run model.jei inputs.npy --public-key release.pub     (on the device)
    """
    from jei_edge.bundle.signing import sign as do_sign

    out = do_sign(bundle, key)
    if as_json:
        emit_json(out)
    else:
        click.echo(f"signed {out['bundle']} with key {out['fingerprint']}")
