import pytest

from jei_edge.compile.plan import plan_stages
from jei_edge.model.costs import count_costs
from tests.runtime.helpers import spread_model


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_one_stage_per_exit_and_costs_add_up(family):
    model = spread_model(family)
    costs = count_costs(model).to_dict()
    plans = plan_stages(model, costs)
    assert len(plans) == model.num_exits
    assert [p.blocks for p in plans] == [tuple(r) for r in model.stage_ranges()]
    assert [p.gated for p in plans] == [True] * model.num_gates + [False]
    assert plans[0].input_name == "x" and all(p.input_name == "hidden_in" for p in plans[1:])
    assert plans[-1].output_names == ("probs",)
    assert sum(p.macs for p in plans) == costs["full_macs"]
    assert all(p.macs > 0 for p in plans)
