"""Causal graph: validation and back-door adjustment sets derived with networkx."""
import pytest

from causalrec.causal_graph import (
    CausalGraphError,
    adjustment_set,
    backdoor_adjustment_set,
    build_graph,
    is_valid_adjustment_set,
)
from causalrec.config import Config


def test_default_graph_adjustment_sets():
    cfg = Config()
    assert adjustment_set(cfg, "recommended", "outcome") == ["item_features", "user_features"]
    # exposure is also caused by the recommendation, which affects the outcome directly: adjust for it
    assert adjustment_set(cfg, "exposure", "outcome") == ["item_features", "recommended", "user_features"]
    g = build_graph(cfg.causal_graph.edges)
    for t in ("recommended", "exposure"):
        z = adjustment_set(cfg, t, "outcome")
        assert is_valid_adjustment_set(g, t, "outcome", z)
        # minimal: dropping any element breaks the back-door criterion
        for v in z:
            assert not is_valid_adjustment_set(g, t, "outcome", set(z) - {v})


def test_descendants_of_the_treatment_are_never_adjusted_for():
    g = build_graph(["user_features -> recommended", "recommended -> exposure", "exposure -> outcome",
                     "user_features -> outcome", "popularity -> exposure"])
    z = backdoor_adjustment_set(g, "recommended", "outcome")
    assert z == ["user_features"]
    assert not is_valid_adjustment_set(g, "recommended", "outcome", {"user_features", "exposure"})


def test_unidentified_effect_raises():
    g = build_graph(["unobserved_preference -> recommended", "unobserved_preference -> outcome",
                     "recommended -> outcome", "user_features -> recommended"])
    with pytest.raises(CausalGraphError, match="no back-door adjustment set"):
        backdoor_adjustment_set(g, "recommended", "outcome")
    # once the preference is proxied by an observed cause of both, adjustment works again
    g2 = build_graph(["user_features -> recommended", "user_features -> outcome", "recommended -> outcome"])
    assert backdoor_adjustment_set(g2, "recommended", "outcome") == ["user_features"]


def test_bad_graphs_fail_with_clear_errors():
    with pytest.raises(CausalGraphError, match="cycle"):
        build_graph(["exposure -> outcome", "outcome -> exposure"])
    with pytest.raises(CausalGraphError, match="unknown node 'weather'"):
        build_graph(["weather -> outcome"])
    with pytest.raises(CausalGraphError, match="parent -> child"):
        build_graph(["exposure outcome"])
    with pytest.raises(CausalGraphError, match="not in the causal graph"):
        backdoor_adjustment_set(build_graph(["exposure -> outcome"]), "recommended", "outcome")


def test_is_valid_adjustment_set_rejects_latent_and_absent_nodes():
    g = build_graph(["unobserved_preference -> recommended", "unobserved_preference -> outcome",
                     "recommended -> outcome"])
    # a latent confounder would block the path, but no table holds it: backdoor_adjustment_set never picks it
    assert not is_valid_adjustment_set(g, "recommended", "outcome", ["unobserved_preference"])
    g2 = build_graph(Config().causal_graph.edges)
    assert "time" not in g2
    # a known node the declared graph does not contain: a clear error, not networkx's NodeNotFound
    with pytest.raises(CausalGraphError, match="'time' not in the causal graph"):
        is_valid_adjustment_set(g2, "recommended", "outcome", ["user_features", "item_features", "time"])
    with pytest.raises(CausalGraphError, match="not in the causal graph"):
        is_valid_adjustment_set(g2, "time", "outcome", ["user_features"])


def test_propensity_models_say_which_back_door_nodes_they_cannot_adjust_for(caplog):
    """The exposure set holds 'recommended', which the propensity models have no feature columns for:
    it was dropped in silence while the tables' metadata claimed the back-door criterion."""
    from causalrec.propensity.job import adjustment_set as model_set

    cfg = Config()
    with caplog.at_level("WARNING", logger="causalrec.propensity.job"):
        groups, source = model_set(cfg, "exposure")
    assert groups == ["item_features", "user_features"]
    assert source == "causal_graph back-door criterion without recommended (no feature columns)"
    assert "may leave a back-door path open" in caplog.text
    assert model_set(cfg, "recommended") == (["item_features", "user_features"], "causal_graph back-door criterion")
