"""The backbone cut in two at a node: what runs after it (the *tail*), for training the last block(s) on cached
activations (``extract --cache-at NODE``, ``train-head --head tail``).

Node names are torchvision's feature-extraction names (``create_feature_extractor``, ``get_graph_node_names``):
``layer3`` for a ResNet, ``features.16`` for a MobileNetV2; a module's name means its last operation. The graph is
traced here with the same tracer and settings as ``create_feature_extractor``, so the tail's input is exactly what
that function returns for the node.

The tail keeps the backbone's qualified names (``layer4.0.conv1.weight``): putting a trained tail back into the
backbone is ``model.load_state_dict(tail.state_dict(), strict=False)`` (:func:`put_back`).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import fx, nn
from torchvision.models.feature_extraction import NodePathTracer

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


def _trace(model: nn.Module) -> tuple[fx.Graph, dict[fx.Node, str]]:
    """The backbone's graph and each node's torchvision name, traced as ``create_feature_extractor`` traces."""
    # Private, but it is what defines the node names create_feature_extractor accepts (torchvision.ops as leaves):
    # tracing any other way could name or split the graph differently from the activations extract stored.
    from torchvision.models.feature_extraction import _set_default_tracer_kwargs

    tracer = NodePathTracer(**_set_default_tracer_kwargs(None))
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types for an untraceable forward
        raise PipelineError(
            f"cannot trace {type(model).__name__} to cut it ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    return graph, dict(tracer.node_to_qualname)


def _find(graph: fx.Graph, names: dict[fx.Node, str], node: str) -> fx.Node:
    """The node ``create_feature_extractor`` returns for ``node``: the last one whose name, cut to the query's
    depth, equals it (``layer3`` -> ``layer3.1.relu_1``)."""
    depth = node.count(".") + 1
    for n in reversed(list(graph.nodes)):
        name = names.get(n)
        if name is not None and ".".join(name.split(".")[:depth]) == node:
            return n
    raise PipelineError(f"no node {node!r} in this backbone; `pipeline inspect --nodes BACKBONE` lists them")


def _needed(output: fx.Node, cut: fx.Node) -> set[fx.Node]:
    """Every node the output depends on, walking back from it and stopping at the cut."""
    seen: set[fx.Node] = set()
    stack = [output]
    while stack:
        n = stack.pop()
        if n in seen or n is cut:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def tail_after(model: nn.Module, node: str) -> fx.GraphModule:
    """The part of ``model`` that runs after ``node``, up to its output (the classifier's input, once the classifier
    is ``nn.Identity`` as in ``load_backbone``): one input, ``node``'s output. A deep copy: training it leaves
    ``model`` alone. Its parameters and buffers keep ``model``'s qualified names.

    A cut that a later operation jumps over (a residual connection adding a value from before the cut) cannot be
    made: refused with one line naming the value."""
    graph, names = _trace(model)
    cut = _find(graph, names, node)
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    output = next(n for n in reversed(nodes) if n.op == "output")
    needed = _needed(output, cut)
    if cut not in {a for n in needed for a in n.all_input_nodes}:
        raise PipelineError(f"the output does not depend on node {node!r}; choose a node on the main path")
    for n in sorted(needed, key=position.get):
        if position[n] > position[cut]:
            early = [
                a for a in n.all_input_nodes if a is not cut and position[a] < position[cut] and a.op != "get_attr"
            ]
            if early:
                used = names.get(early[0], early[0].name)
                raise PipelineError(
                    f"cannot cut at {node!r}: {names.get(n, n.name)} uses {used}, computed before the cut (a skip "
                    "connection across it); cut between blocks, e.g. at a block's last node"
                )
    new = fx.Graph()
    env = {cut: new.placeholder("x")}
    for n in sorted(needed, key=position.get):  # parameters read by get_attr may sit before the cut: copied
        env[n] = new.node_copy(n, lambda a: env[a])
    tail = fx.GraphModule(model, new, f"{type(model).__name__}Tail")
    with torch.inference_mode(False):  # trainable tensors even when cut inside inference mode
        return copy.deepcopy(tail)  # GraphModule shares model's submodules; the copy is the tail's own


def tail_parameters(tail: nn.Module) -> dict[str, torch.Tensor]:
    """The tail's state (parameters and buffers), under the backbone's qualified names."""
    return dict(tail.state_dict())


def put_back(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a trained tail's ``state`` (backbone names) into ``model`` in place; every name and shape must fit."""
    expected = model.state_dict()
    unknown = [k for k in state if k not in expected]
    if unknown:
        raise PipelineError(f"the tail's {unknown[0]} is not a tensor of this backbone ({len(unknown)} such)")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise PipelineError(f"the tail's {k} has shape {tuple(state[k].shape)}; the backbone's is "
                            f"{tuple(expected[k].shape)}")  # fmt: skip
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)
