"""The capture model: a capture records without running, refuses what would wait as CUDA does, lets a pinned copy
through, replays the captured addresses (and says when an input was reallocated), takes new kernel-node
parameters, and pads a batch to a captured size."""

import numpy as np
import pytest

from course_lib.labs.graph_capture import (
    CAPTURE_INVALIDATED,
    CAPTURE_UNSUPPORTED,
    CopyNode,
    CudaError,
    Device,
    Kernel,
    KernelNode,
    LaunchCosts,
    StaleAddressError,
    captured_size,
)


def _scale(x: np.ndarray, factor: float, out: np.ndarray) -> None:
    out[...] = factor * x


SCALE = Kernel("scale", _scale)


@pytest.fixture
def device() -> Device:
    return Device()


def test_a_capture_records_the_launches_and_runs_them_only_on_replay(device):
    x, y = device.malloc("x", 4), device.malloc("y", 4)
    x.array[...] = [1, 2, 3, 4]
    stream = device.stream()
    with stream.capture() as captured:
        stream.launch(SCALE, 1, x, 2.0, y)
        assert stream.is_capturing
    assert not stream.is_capturing
    np.testing.assert_array_equal(y.array, 0)  # recorded, not run
    assert [type(node) for node in captured.graph.nodes] == [KernelNode]
    captured.graph.instantiate().launch(stream)
    np.testing.assert_array_equal(y.array, [2, 4, 6, 8])


@pytest.mark.parametrize("refused", ["synchronize", "read", "malloc", "free", "pageable copy"])
def test_what_would_wait_is_refused_and_breaks_the_capture(device, refused):
    x = device.malloc("x", 4)
    pageable = device.host_alloc("host x", 4, pinned=False)
    stream = device.stream()
    calls = {"synchronize": stream.synchronize, "read": lambda: stream.read(x),
             "malloc": lambda: device.malloc("scratch", 4), "free": lambda: device.free(x),
             "pageable copy": lambda: stream.copy_async(x, pageable)}
    stream.begin_capture()
    with pytest.raises(CudaError, match="operation not permitted when stream is capturing") as error:
        calls[refused]()
    assert error.value.code == CAPTURE_UNSUPPORTED
    with pytest.raises(CudaError) as ended:
        stream.end_capture()
    assert ended.value.code == CAPTURE_INVALIDATED
    stream.synchronize()  # the capture is over: the same calls are fine again
    calls[refused]()


def test_the_context_manager_reports_the_call_that_broke_the_capture(device):
    stream = device.stream()
    with pytest.raises(CudaError) as error, stream.capture():
        stream.synchronize()
    assert error.value.code == CAPTURE_UNSUPPORTED
    assert not stream.is_capturing


def test_an_async_copy_from_pinned_memory_is_captured(device):
    staging, x = device.host_alloc("staging", 3), device.malloc("x", 3)
    stream = device.stream()
    with stream.capture() as captured:
        stream.copy_async(x, staging)
    staging.array[...] = [7, 8, 9]  # filled after the capture, before the replay: the replay copies these
    captured.graph.instantiate().launch(stream)
    assert isinstance(captured.graph.nodes[0], CopyNode)
    np.testing.assert_array_equal(x.array, [7, 8, 9])


def test_a_replay_says_when_an_input_was_reallocated_or_freed(device):
    x, y = device.malloc("x", 4), device.malloc("y", 4)
    stream = device.stream()
    with stream.capture() as captured:
        stream.launch(SCALE, 1, x, 2.0, y)
    graph = captured.graph.instantiate()
    new_x = device.malloc("x", 4)  # the classic bug: new inputs in a new buffer
    assert new_x.address != x.address
    with pytest.raises(StaleAddressError, match=f"'x' at {x.address:#x}, but that buffer is now at {new_x.address:#x}"):
        graph.launch(stream)
    device.free(y)
    graph.set_kernel_node_params(0, new_x, 2.0, device.malloc("y2", 4))  # re-pointed: replays again
    graph.launch(stream)
    device.free(new_x)
    with pytest.raises(StaleAddressError, match="is freed"):
        graph.launch(stream)


def test_set_kernel_node_params_edits_the_instantiated_graph_only(device):
    x, y, z = (device.malloc(name, 2) for name in "xyz")
    x.array[...] = [1, 2]
    stream = device.stream()
    with stream.capture() as captured:
        stream.copy_async(y, x)
        stream.launch(SCALE, 1, x, 2.0, y)
    graph = captured.graph.instantiate()
    (index,) = captured.graph.kernel_nodes("scale")
    graph.set_kernel_node_params(index, x, 10.0, z)
    graph.launch(stream)
    np.testing.assert_array_equal(z.array, [10, 20])
    np.testing.assert_array_equal(y.array, [1, 2])  # the node no longer writes y; the copy still does
    assert captured.graph.nodes[index].args[2] is y  # the template graph is unchanged
    with pytest.raises(CudaError, match="takes 3 arguments, got 2"):
        graph.set_kernel_node_params(index, x, z)
    with pytest.raises(CudaError, match="is not a kernel node"):
        graph.set_kernel_node_params(0, x, 1.0, z)


def test_a_batch_is_padded_to_the_next_captured_size():
    assert [captured_size(rows, (1, 2, 4, 8)) for rows in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="fits no captured size"):
        captured_size(9, (1, 2, 4, 8))


def test_the_timeline_charges_each_eager_launch_but_one_graph_launch():
    costs = LaunchCosts(host_per_launch_s=5e-6, graph_launch_s=5e-6, graph_node_s=1e-6, kernel_s={"other": 2e-6})
    device = Device(costs)
    x, y = device.malloc("x", 1), device.malloc("y", 1)
    stream = device.stream()
    for _ in range(3):
        stream.launch(SCALE, 1, x, 1.0, y)
    host = [r for r in device.timeline if r["lane"] == "host"]
    gpu = [r for r in device.timeline if r["lane"] == "gpu"]
    assert len(host) == len(gpu) == 3 and host[-1]["end_us"] == pytest.approx(15)
    assert gpu[0]["start_us"] == pytest.approx(5)  # a kernel starts once its launch is issued
    with stream.capture() as captured:
        for _ in range(3):
            stream.launch(SCALE, 1, x, 1.0, y)
    device.clear_timeline()
    captured.graph.instantiate().launch(stream)
    assert [r["lane"] for r in device.timeline].count("host") == 1
    assert device.gpu_clock_s == pytest.approx(5e-6 + 3 * (2e-6 + 1e-6))
