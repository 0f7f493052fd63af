"""The one walk over names read inside If / Loop / Scan bodies, the one maker of fresh names, and
which ops hold weights."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from worker.pipeline import graph, subgraphs


def _nested_if():
    """main: If(cond) whose then-branch computes t = Add(x, w) and holds another If whose branch
    reads t (the enclosing body's) and y (the main graph's); the else-branch reads nothing."""
    out = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    inner = helper.make_graph([helper.make_node("Mul", ["t", "y"], ["u"])], "inner", [], [out("u")])
    then = helper.make_graph([helper.make_node("Add", ["x", "w"], ["t"]),
                              helper.make_node("If", ["cond"], ["v"], then_branch=inner, else_branch=inner)],
                             "then", [], [out("v")])
    other = helper.make_graph([helper.make_node("Constant", [], ["k"], value_float=1.0)], "else", [], [out("k")])
    node = helper.make_node("If", ["cond"], ["r"], then_branch=then, else_branch=other)
    main = helper.make_graph([node], "main", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                              for n in ("x", "w", "y")]
                             + [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [out("r")])
    return helper.make_model(main), node


def test_outer_reads_leave_out_what_an_enclosing_body_defines_inner_reads_keep_it():
    model, node = _nested_if()
    assert subgraphs.outer_reads(node) == {"x", "w", "y", "cond"}
    assert subgraphs.inner_reads(node) == {"x", "w", "y", "cond", "t"}
    assert subgraphs.subgraph_reads(model) == {"x", "w", "y", "cond", "t"}
    assert subgraphs.subgraph_reads(model, outer_only=True) == {"x", "w", "y", "cond"}


def test_fresh_name_takes_the_base_when_free_else_the_smallest_free_suffix():
    taken = {"a", "a_1"}
    assert graph.fresh_name("b", taken) == "b"
    assert graph.fresh_name("a", taken) == "a_2"
    assert graph.fresh_name("b", taken, numbered=True) == "b_0"
    assert {"b", "a_2", "b_0"} <= taken


def test_a_body_output_that_names_an_outer_tensor_is_read():
    """An If branch may return an outer tensor as is (no node inside reads it): the If still needs
    it produced first, and a rewrite must not drop or rename it."""
    passthrough = helper.make_graph([], "else", [], [helper.make_tensor_value_info("state", TensorProto.FLOAT, [2])])
    computed = helper.make_graph([helper.make_node("Neg", ["x"], ["negated"])], "then", [],
                                 [helper.make_tensor_value_info("negated", TensorProto.FLOAT, [2])])
    node = helper.make_node("If", ["cond"], ["out"], then_branch=computed, else_branch=passthrough)
    assert subgraphs.outer_reads(node) == {"x", "state"}
    assert subgraphs.inner_reads(node) == {"x", "state"}


def test_ops_of_another_domain_are_no_layers_even_by_onnx_names():
    # com.microsoft.nchwc::Conv keeps its weight in a blocked layout: lowrank factorized one into a
    # model ONNX Runtime could not run
    from onnx import TensorProto, helper, numpy_helper
    weight = numpy_helper.from_array(np.ones((16, 16, 3, 3), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="blocked", domain="com.microsoft.nchwc")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 6, 6])], [weight])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft.nchwc", 1)])
    assert graph.weight_layers(model) == []
    assert "com.microsoft.nchwc::Conv blocked" in graph.unreadable_weights(model)["w"]
