"""The assumed causal graph, declared in config, and back-door adjustment sets derived from it.

Why: a propensity model is only a valid de-confounder if it conditions on a set that blocks
every back-door path from the treatment to the outcome (Pearl 2009, Thm 3.3.2). Writing the
graph down (``causal_graph.edges``: "parent -> child") makes that assumption reviewable, and
deriving the set with networkx's d-separation routines (not by hand) keeps it correct
when the graph changes.

Back-door criterion for (T -> Y): Z contains no descendant of T, and Z d-separates T and Y
in the graph with T's outgoing edges removed. We return a *minimal* such Z
(``networkx.find_minimal_d_separator`` restricted to non-descendants of T).
"""
from __future__ import annotations

import networkx as nx

from causalrec.config import Config

# node names the pipeline knows how to turn into columns or tables
KNOWN_NODES = frozenset({
    "user_features", "item_features", "context", "position", "popularity", "time",
    "exposure", "recommended", "outcome", "unobserved_preference",
})


class CausalGraphError(ValueError):
    """The declared graph is malformed (cycle, unknown node, bad edge text) or has no adjustment set."""


def parse_edge(text: str) -> tuple[str, str]:
    parts = [p.strip() for p in str(text).split("->")]
    if len(parts) != 2 or not all(parts):
        raise CausalGraphError(f"causal_graph.edges: edge {text!r} must read 'parent -> child'")
    return parts[0], parts[1]


def build_graph(edges, known_nodes=KNOWN_NODES) -> nx.DiGraph:
    """A validated DiGraph: known node names, no self-loops, acyclic."""
    g = nx.DiGraph()
    for e in edges:
        a, b = parse_edge(e)
        for node in (a, b):
            if known_nodes is not None and node not in known_nodes:
                raise CausalGraphError(
                    f"causal_graph.edges: edge {e!r} names unknown node {node!r}; known nodes: {sorted(known_nodes)}")
        if a == b:
            raise CausalGraphError(f"causal_graph.edges: edge {e!r} is a self-loop")
        g.add_edge(a, b)
    if not nx.is_directed_acyclic_graph(g):
        cycle = " -> ".join(u for u, _ in nx.find_cycle(g))
        raise CausalGraphError(f"causal_graph.edges: the graph has a cycle ({cycle}); a causal graph must be acyclic")
    return g


def graph_from_config(cfg: Config) -> nx.DiGraph:
    return build_graph(cfg.causal_graph.edges)


def is_latent(node: str) -> bool:
    """``unobserved_*`` nodes are latent: the graph may name them, no table holds them."""
    return node.startswith("unobserved")


def _require_in_graph(g: nx.DiGraph, nodes) -> None:
    missing = sorted(set(nodes) - set(g))
    if missing:
        which = "node" if len(missing) == 1 else "nodes"
        raise CausalGraphError(
            f"{which} {', '.join(map(repr, missing))} not in the causal graph (nodes: {sorted(g)}); the back-door "
            "criterion is only defined for nodes of the graph: add their edges to causal_graph.edges")


def backdoor_adjustment_set(g: nx.DiGraph, treatment: str, outcome: str) -> list[str]:
    """A minimal set satisfying the back-door criterion for (treatment -> outcome), sorted.

    Nodes named ``unobserved_*`` are latent: they may be in the graph but never in the set.
    """
    _require_in_graph(g, (treatment, outcome))
    if treatment == outcome:
        raise CausalGraphError("treatment and outcome must differ")
    backdoor = g.copy()
    backdoor.remove_edges_from(list(g.out_edges(treatment)))
    allowed = {v for v in g if not is_latent(v)} - nx.descendants(g, treatment) - {treatment, outcome}
    z = nx.find_minimal_d_separator(backdoor, {treatment}, {outcome}, restricted=allowed)
    if z is None:
        raise CausalGraphError(
            f"no back-door adjustment set exists for {treatment} -> {outcome} among the observed "
            f"non-descendants {sorted(allowed)}; the effect is not identified by adjustment under this graph")
    return sorted(z)


def is_valid_adjustment_set(g: nx.DiGraph, treatment: str, outcome: str, z) -> bool:
    """Back-door check of a given set (e.g. one a user proposes).

    False when ``z`` holds a latent (``unobserved_*``) node, which cannot be adjusted for, or a
    descendant of the treatment, or does not block every back-door path. Raises
    :class:`CausalGraphError` when the treatment, the outcome or a member of ``z`` is not a node
    of ``g``: the graph says nothing about it, so the criterion cannot be checked.
    """
    z = set(z)
    _require_in_graph(g, {treatment, outcome} | z)
    if any(is_latent(v) for v in z):
        return False
    if z & (nx.descendants(g, treatment) | {treatment, outcome}):
        return False
    backdoor = g.copy()
    backdoor.remove_edges_from(list(g.out_edges(treatment)))
    return nx.is_d_separator(backdoor, {treatment}, {outcome}, z)


def adjustment_set(cfg: Config, treatment: str, outcome: str) -> list[str]:
    """The back-door adjustment set for ``treatment -> outcome`` under ``cfg.causal_graph``.

    E.g. with the default graph: ``adjustment_set(cfg, "recommended", "outcome")`` ->
    ``["item_features", "user_features"]``; for the exposure propensity
    ``adjustment_set(cfg, "exposure", "outcome")`` also needs ``recommended``.
    """
    return backdoor_adjustment_set(graph_from_config(cfg), treatment, outcome)
