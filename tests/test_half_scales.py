"""edgellm.convert.half_scales: the kernel twin's block scales as embedded float16 copies."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx (the [convert] extra) builds the test graphs")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgellm.convert.half_scales import halve_scales  # noqa: E402
from edgellm.errors import ModelFormatError  # noqa: E402


def graph_with(scales: np.ndarray, shared_with_other_op: bool = False) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMulQ8", ["A", "B", "S"], ["Y"], domain="ai.edgellm", K=64, N=2, bits=8,
                              block_size=32)]
    if shared_with_other_op:  # a standard node still reading the fp32 tensor keeps it alive
        nodes.append(helper.make_node("Identity", ["S"], ["S_copy"]))
    inits = [numpy_helper.from_array(np.full((2, 2, 32), 128, np.uint8), "B"), numpy_helper.from_array(scales, "S")]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    if shared_with_other_op:
        outputs.append(helper.make_tensor_value_info("S_copy", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 64])], outputs,
                              initializer=inits)
    return helper.make_model(graph)


def test_scales_become_embedded_float16_and_the_fp32_copy_goes(tmp_path):
    scales = np.array([9.5e-5, 3.3e-3, 0.12, 7.5], np.float32)  # SmolLM2-135M's smallest is 9.5e-5
    model = graph_with(scales)
    assert halve_scales(model, tmp_path) == 1
    node = model.graph.node[0]
    assert node.input[2] == "S.f16"
    tensors = {t.name: t for t in model.graph.initializer}
    assert "S" not in tensors and tensors["S.f16"].data_type == TensorProto.FLOAT16
    np.testing.assert_allclose(numpy_helper.to_array(tensors["S.f16"]).astype(np.float32), scales, rtol=2 ** -11)


def test_a_tensor_still_read_elsewhere_is_kept(tmp_path):
    model = graph_with(np.array([0.01, 0.02, 0.03, 0.04], np.float32), shared_with_other_op=True)
    halve_scales(model, tmp_path)
    assert {t.name for t in model.graph.initializer} == {"B", "S", "S.f16"}


@pytest.mark.parametrize("bad", [1e6, 1e-6])  # overflows; a subnormal that keeps ~4 bits
def test_a_scale_float16_cannot_hold_is_an_error_naming_it(tmp_path, bad):
    with pytest.raises(ModelFormatError, match=r"scale .* in 'S' does not fit float16.*--no-kernel-graph"):
        halve_scales(graph_with(np.array([0.01, bad, 0.03, 0.04], np.float32)), tmp_path)
