"""The torch-cuda executor's stage specs of a ``--plan`` bundle, derived on the CPU (no GPU needed):
``stages_from_model`` with the manifest's exit spans must describe exactly the stage graphs the
build exported (names, per-row shapes, dtypes, exits, gates), and ``check_model_matches`` accepts
the bundle's model.pt. The device run itself is tests/gpu/test_cuda_runtime.py (merged plans)."""

from __future__ import annotations

import json

import pytest

from jei_edge.errors import BundleError

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def merged_bundle(tmp_path_factory):
    from jei_edge.compile import BuildOptions, build_bundle
    from jei_edge.model.checkpoint import load_checkpoint
    from tests.runtime.helpers import save_spread

    tmp = tmp_path_factory.mktemp("spans")
    ckpt = save_spread(tmp / "m.pt", "vit")
    model, _ = load_checkpoint(ckpt)
    n = len(model.stage_ranges())
    out = tmp / "m.jei"
    build_bundle(ckpt, out, BuildOptions(parity_samples=200, stage_samples=32, plan=f"0-1,2-{n - 1}"))
    return model, out


def test_specs_of_merged_stages_equal_the_manifest(merged_bundle):
    from jei_edge.backends.torch_cuda.executor import check_model_matches, stages_from_model
    from jei_edge.bundle.manifest import parse_manifest

    model, out = merged_bundle
    m = parse_manifest(json.loads((out / "manifest.json").read_text()))
    spans = [(st.exits[0], st.exits[-1]) for st in m.stages]
    assert any(st.merged for st in m.stages) and m.stages[-1].merged  # the final head is in a merged stage
    got = stages_from_model(model, torch, torch.device("cpu"), spans)
    assert len(got) == len(m.stages)
    for g, want in zip(got, m.stages):
        assert (g.exits, g.gates) == (want.exits, want.gates)
        assert [(t.name, t.shape, t.dtype) for t in g.inputs] == [(t.name, t.shape, t.dtype) for t in want.inputs]
        assert [(t.name, t.shape, t.dtype) for t in g.outputs] == [(t.name, t.shape, t.dtype) for t in want.outputs]
    check_model_matches(m, got, m.num_classes, "b")
    # the one-exit-per-stage specs of the same model do not match this bundle
    with pytest.raises(BundleError, match="stages but its model.pt has"):
        check_model_matches(m, stages_from_model(model, torch, torch.device("cpu")), m.num_classes, "b")


def test_spans_must_cover_every_exit_in_order():
    from jei_edge.backends.torch_cuda.executor import check_spans

    assert check_spans(None, 3) == [(0, 0), (1, 1), (2, 2)]
    assert check_spans([(0, 1), (2, 2)], 3) == [(0, 1), (2, 2)]
    for bad in ([(0, 0), (2, 2)], [(0, 2), (2, 2)], [(1, 2)], [], [(0, 1)]):
        with pytest.raises(BundleError, match="do not cover exits 0..2"):
            check_spans(bad, 3)
