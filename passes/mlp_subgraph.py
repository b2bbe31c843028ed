"""A matched MLP cut out of its graph as a standalone function x -> y.

Verification compares each MoE layer against this, the dense model's own ops, rather than
against our reading of its weights, so a mis-identified activation or weight layout shows up.
"""

from __future__ import annotations

import torch.fx as fx

from .find_mlps import MLPMatch


def mlp_function(gm: fx.GraphModule, match: MLPMatch) -> fx.GraphModule:
    members = set(match.nodes)
    by_name = {n.name: n for n in gm.graph.nodes}
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {by_name[match.input_node]: g.placeholder("x")}
    for node in gm.graph.nodes:
        if node.name not in members:
            continue
        for inp in node.all_input_nodes:
            if inp not in env:
                if inp.op != "get_attr":
                    raise ValueError(f"MLP node {node.name} reads {inp.name} from outside the MLP")
                env[inp] = g.node_copy(inp)
        env[node] = g.node_copy(node, lambda a: env[a])
    g.output(env[by_name[match.output_node]])
    fn = fx.GraphModule(gm, g, "DenseMLP")
    fn.eval()
    return fn
