"""The default (pooled) mode: exact statistics, batch-split invariance, generations, writing back, errors."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnfold
from bnfold.errors import UsageError
from bnfold.recalibration import api as recalibration_api
from bnfold.recalibration.statistics import PooledStatistics, TorchAverage
from bnfold.training import batch_statistics
from bnfold.validate.model_source import load_model_source
from bnfold.validate.sessions import CPU, make_session
from tests.recalibrate.recalibrate_helpers import draw, export, onnx_statistics, set_garbage_statistics, torch_module

DEMO = "models/demo_resnet.onnx"


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=7), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
    offset=st.sampled_from([0.0, 1e3, -1e6]),
)
def test_pooled_statistics_do_not_depend_on_the_split(sizes: list[int], seed: int, offset: float) -> None:
    """Chan's merge over any split (empty batches included) equals the two-pass statistics of all the data, to
    1e-12 relative (variance relative to itself, mean relative to the spread), even far from zero."""
    if sum(sizes) < 2:
        sizes = [*sizes, 2]
    data = np.random.default_rng(seed).standard_normal((sum(sizes), 3, 4)) * 2.0 + offset
    accumulator = PooledStatistics(3)
    start = 0
    for size in sizes:
        accumulator.add(data[start : start + size])
        start += size
    mean, var = batch_statistics(data)
    assert accumulator.count == data.shape[0] * 4
    np.testing.assert_allclose(accumulator.mean, mean, rtol=0, atol=1e-12 * (abs(offset) + 2.0))
    np.testing.assert_allclose(accumulator.variance(unbiased=False), var, rtol=1e-12 * (1 + offset**2 / 4), atol=0)
    n = accumulator.count
    np.testing.assert_allclose(accumulator.variance(unbiased=True), var * n / (n - 1), rtol=1e-11 * (1 + offset**2))


def test_pooled_variance_needs_enough_elements() -> None:
    accumulator = PooledStatistics(2)
    accumulator.add(np.ones((1, 2)))
    np.testing.assert_array_equal(accumulator.variance(unbiased=False), [0.0, 0.0])
    with pytest.raises(UsageError, match="1 element"):
        accumulator.variance(unbiased=True)


def test_torch_average_is_the_mean_of_per_batch_statistics() -> None:
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((size, 2, 3)) + index for index, size in enumerate((2, 5, 4))]
    average = TorchAverage(2)
    for batch in batches:
        average.add(batch)
    means = [batch_statistics(b)[0] for b in batches]
    unbiased = [batch_statistics(b)[1] * (b.size / 2) / (b.size / 2 - 1) for b in batches]
    np.testing.assert_allclose(average.mean, np.mean(means, axis=0), rtol=1e-14)
    np.testing.assert_allclose(average.var, np.mean(unbiased, axis=0), rtol=1e-14)
    with pytest.raises(UsageError, match="1 value"):
        average.add(np.ones((1, 2)))


def _demo_batches(sizes: tuple[int, ...], seed: int = 0) -> list[dict[str, np.ndarray]]:
    data = draw((sum(sizes), 3, 32, 32), seed)
    bounds = np.cumsum((0, *sizes))
    return [{"input": data[a:b]} for a, b in itertools.pairwise(bounds)]


def _statistics(model: ir.Model) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (node.inputs[3].const_value.numpy(), node.inputs[4].const_value.numpy())
        for node in model.graph
        if node.op_type == "BatchNormalization"
    ]


def test_recalibrated_model_does_not_depend_on_the_batch_split() -> None:
    """The same 12 samples as 1×12, 3×4 and 5+1+6: identical statistics up to float32 rounding of the stored
    values (onnxruntime computes each sample's activations alike whatever the batch size; the merge is exact
    to ~1e-15, see the property test above)."""
    results = [
        _statistics(bnfold.recalibrate(DEMO, _demo_batches(sizes))[0]) for sizes in ((12,), (4, 4, 4), (5, 1, 6))
    ]
    for other in results[1:]:
        for (mean, var), (other_mean, other_var) in zip(results[0], other, strict=True):
            np.testing.assert_allclose(other_mean, mean, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(other_var, var, rtol=1e-6)


def _measured_inputs(model: ir.Model, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Each BN's input X as the model itself computes it (an independent session with X as extra outputs)."""
    names = tuple(node.inputs[0].name for node in model.graph if node.op_type == "BatchNormalization")
    source = load_model_source(model).with_extra_outputs(names)
    outputs = make_session(source, CPU).run(batch, list(names))
    return [outputs[name] for name in names]


def _assert_statistics_describe_own_inputs(model: ir.Model, batch: dict[str, np.ndarray]) -> None:
    for (mean, var), x in zip(_statistics(model), _measured_inputs(model, batch), strict=True):
        expected_mean, expected_var = batch_statistics(x)
        np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, expected_var, rtol=1e-5, atol=1e-7)


def test_every_bn_holds_the_statistics_of_its_input_in_the_recalibrated_model() -> None:
    """demo_resnet has BNs inside residual blocks (branch and shortcut BNs feed an Add). After recalibration,
    running the *recalibrated* model on all the data gives each BN an input whose mean/var are exactly the
    stored ones: the generations ordered the work right. 7 generations, 7 passes."""
    model = bnfold.files.load_model(DEMO)
    set_garbage_statistics(model)
    batches = _demo_batches((4, 4, 4))
    recalibrated, report = bnfold.recalibrate(model, batches)
    assert [record.generation for record in report.records] == [0, 1, 2, 3, 4, 3, 5, 6, 5]
    assert report.passes == 7 and report.batches == 3
    _assert_statistics_describe_own_inputs(recalibrated, {"input": np.concatenate([b["input"] for b in batches])})


def test_statistics_are_wrong_without_generations(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: measuring every BN in one pass (all generation 0) reads inputs computed
    with the garbage upstream statistics."""
    monkeypatch.setattr(recalibration_api, "generations", lambda model, targets: [0] * len(targets))
    model = bnfold.files.load_model(DEMO)
    set_garbage_statistics(model)
    batches = _demo_batches((4, 4, 4))
    recalibrated, _ = bnfold.recalibrate(model, batches)
    with pytest.raises(AssertionError):
        _assert_statistics_describe_own_inputs(recalibrated, {"input": np.concatenate([b["input"] for b in batches])})


def test_torch_convention_stores_the_unbiased_variance() -> None:
    batches = _demo_batches((3, 3))
    onnx_model, onnx_report = bnfold.recalibrate(DEMO, batches, convention="onnx")
    torch_model, torch_report = bnfold.recalibrate(DEMO, batches, convention="torch")
    assert (onnx_report.convention, torch_report.convention) == ("onnx", "torch")
    # The first BN reads the data itself: same mean, variance scaled by n/(n−1). Later BNs read inputs that
    # depend on the upstream BNs' (different) variances.
    (mean, var), (torch_mean, torch_var) = _statistics(onnx_model)[0], _statistics(torch_model)[0]
    n = onnx_report.records[0].elements
    assert n == 6 * 32 * 32
    np.testing.assert_array_equal(torch_mean, mean)
    np.testing.assert_allclose(torch_var, var * n / (n - 1), rtol=2e-7)


def _shared_statistics_model() -> ir.Model:
    """x → BN(a) → Relu → BN(b): both BNs read the same mean/var initializers (an exporter's dedup)."""
    c = 2
    initializers = [
        onnx.numpy_helper.from_array(np.ones(c, np.float32), "scale"),
        onnx.numpy_helper.from_array(np.zeros(c, np.float32), "bias"),
        onnx.numpy_helper.from_array(np.zeros(c, np.float32), "mean"),
        onnx.numpy_helper.from_array(np.ones(c, np.float32), "var"),
    ]
    nodes = [
        onnx.helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["a"], name="bn_a"),
        onnx.helper.make_node("Relu", ["a"], ["r"]),
        onnx.helper.make_node("BatchNormalization", ["r", "scale", "bias", "mean", "var"], ["y"], name="bn_b"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "shared",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", c])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", c])],
        initializers,
    )
    return ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 15)]))


def test_shared_statistics_get_separate_tensors_and_originals_are_untouched() -> None:
    model = _shared_statistics_model()
    old_mean = model.graph.initializers["mean"].const_value
    x = draw((50, 2), 1, scale=3.0, offset=5.0)
    recalibrated, report = bnfold.recalibrate(model, [{"x": x}])
    a, b = (node for node in recalibrated.graph if node.op_type == "BatchNormalization")
    assert a.inputs[3] is not b.inputs[3] and a.inputs[4] is not b.inputs[4]
    # bn_a got new initializers; bn_b, then the only reader of "mean"/"var", got new tensors under the old names
    assert (a.inputs[3].name, a.inputs[4].name, b.inputs[3].name, b.inputs[4].name) == (
        "mean_recalibrated",
        "var_recalibrated",
        "mean",
        "var",
    )
    assert b.inputs[3].const_value is not old_mean
    np.testing.assert_array_equal(old_mean.numpy(), [0.0, 0.0])
    mean, var = batch_statistics(x.astype(np.float64))
    np.testing.assert_allclose(a.inputs[3].const_value.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(a.inputs[4].const_value.numpy(), var, rtol=1e-6)
    assert [r.generation for r in report.records] == [0, 1]
    relu = np.maximum((x - mean) / np.sqrt(var + np.float32(1e-5)), 0.0)  # what bn_b reads, with bn_a recalibrated
    relu_mean, relu_var = batch_statistics(relu)
    np.testing.assert_allclose(b.inputs[3].const_value.numpy(), relu_mean, rtol=1e-5)
    np.testing.assert_allclose(b.inputs[4].const_value.numpy(), relu_var, rtol=1e-5)
    onnx.checker.check_model(ir.serde.serialize_model(recalibrated), full_check=True)


def test_bn_with_runtime_statistics_is_skipped_with_a_reason() -> None:
    model = _shared_statistics_model()
    first = next(iter(model.graph))
    fed_mean = ir.Value(name="fed_mean", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    model.graph.inputs.append(fed_mean)
    first.replace_input_with(3, fed_mean)
    batch = {"x": draw((8, 2), 0), "fed_mean": np.zeros(2, np.float32)}
    _, report = bnfold.recalibrate(model, [batch])
    assert [(r.node, r.status) for r in report.records] == [("bn_b", "recalibrated"), ("bn_a", "skipped")]
    assert report.skipped[0].reason == "mean or var is not a constant"


@pytest.mark.parametrize(
    ("batches", "message"),
    [
        ([], "no calibration batches"),
        ([{"x": np.zeros((4, 2), np.float32), "extra": np.zeros(1)}], "unknown key"),
        ([{"y": np.zeros((4, 2), np.float32)}], "missing input"),
        ([{"x": np.zeros((4, 2), np.float64)}], "'x' is float64, the model takes float32"),
        (
            [{"x": np.zeros((4, 3), np.float32)}],
            r"batch 0: BatchNormalization 'bn_a': its input has shape \[4, 3\], not 2",
        ),
        ([{"x": np.zeros((4, 2, 2), np.float32)}], "onnxruntime cannot run the model"),
    ],
)
def test_bad_batches_are_usage_errors(batches: list, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        bnfold.recalibrate(_shared_statistics_model(), batches)


def test_one_shot_iterator_is_refused_when_several_passes_are_needed() -> None:
    batches = iter([{"x": draw((4, 2), 0)}])
    with pytest.raises(UsageError, match="2 passes"):
        bnfold.recalibrate(_shared_statistics_model(), batches)
    # one pass (match_torch) takes an iterator
    _, report = bnfold.recalibrate(_shared_statistics_model(), iter([{"x": draw((4, 2), 0)}]), match_torch=True)
    assert report.passes == 1


def test_unknown_convention_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="convention"):
        bnfold.recalibrate(_shared_statistics_model(), [], convention="biased")


def test_zoo_fp32_model_round_trip_keeps_interface() -> None:
    """Only mean/var change: same nodes, same outputs, and the garbage is gone."""
    name = "mlp"
    model = export(torch_module(name), name)
    set_garbage_statistics(model)
    before = [(node.op_type, node.name) for node in model.graph]
    recalibrated, _ = bnfold.recalibrate(model, [{"input": draw((16, 64), 0)}])
    assert [(node.op_type, node.name) for node in recalibrated.graph] == before
    assert all(np.all(var < 50) for _, var in onnx_statistics(recalibrated).values())


def test_progress_reports_every_batch_of_every_pass() -> None:
    calls = []
    _, report = bnfold.recalibrate(
        DEMO, _demo_batches((2, 2)), progress=lambda done, total: calls.append((done, total))
    )
    assert report.passes == 7
    assert calls == [(done, 14) for done in range(1, 15)]


def test_statistics_from_constant_nodes_are_replaced_by_initializers() -> None:
    """mean/var produced by Constant nodes (as some exporters write them): each BN gets new initializers and the
    orphaned Constant nodes are removed, for every BN (removing nodes must not confuse later BNs)."""
    c = 2
    tensors = {
        "scale": np.ones(c, np.float32),
        "bias": np.zeros(c, np.float32),
        "mean": np.full(c, 7.0, np.float32),
        "var": np.full(c, 9.0, np.float32),
    }
    nodes = []
    for bn, (source, target) in {"bn_a": ("x", "a"), "bn_b": ("r", "y")}.items():
        for role, array in tensors.items():
            value = onnx.numpy_helper.from_array(array, f"{bn}_{role}")
            nodes.append(onnx.helper.make_node("Constant", [], [f"{bn}_{role}"], value=value))
        inputs = [source, *(f"{bn}_{role}" for role in tensors)]
        nodes.append(onnx.helper.make_node("BatchNormalization", inputs, [target], name=bn))
        if bn == "bn_a":
            nodes.append(onnx.helper.make_node("Relu", ["a"], ["r"]))
    graph = onnx.helper.make_graph(
        nodes,
        "constants",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", c])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", c])],
    )
    model = ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 15)]))
    x = draw((40, c), 2, scale=2.0, offset=-3.0)
    recalibrated, report = bnfold.recalibrate(model, [{"x": x}])
    assert len(report.recalibrated) == 2
    ops = [node.op_type for node in recalibrated.graph]
    assert ops.count("Constant") == 4  # scale and bias of both BNs stay; mean and var went
    a, b = (node for node in recalibrated.graph if node.op_type == "BatchNormalization")
    mean, var = batch_statistics(x)
    np.testing.assert_allclose(a.inputs[3].const_value.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(a.inputs[4].const_value.numpy(), var, rtol=1e-6)
    relu_mean, _ = batch_statistics(np.maximum((x - mean) / np.sqrt(var + np.float32(1e-5)), 0.0))
    np.testing.assert_allclose(b.inputs[3].const_value.numpy(), relu_mean, rtol=1e-5)
    onnx.checker.check_model(ir.serde.serialize_model(recalibrated), full_check=True)
