"""What a Triton smoke check sends, from a model's metadata and config (KServe v2), and the
reason a failed load gives from the server's shared log."""

from __future__ import annotations

from pathlib import Path

from modelium.runtimes.triton import SMOKE_MAX_ELEMENTS, _logged_errors, smoke_inputs


def test_fixed_shapes_get_zeros_and_a_batch_of_one() -> None:
    metadata = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2, 3]}]}
    assert smoke_inputs(metadata, {"max_batch_size": 8}) == [
        {"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [0] * 6}
    ]
    flags = {"inputs": [{"name": "m", "datatype": "BOOL", "shape": [2]}]}
    assert smoke_inputs(flags, {"max_batch_size": 0})[0]["data"] == [False, False]  # type: ignore[index]


def test_a_text_input_of_any_length_gets_one_short_text() -> None:
    metadata = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [-1]}]}
    assert smoke_inputs(metadata, {"max_batch_size": 0}) == [
        {"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["Hello"]}
    ]


def test_open_or_huge_shapes_send_nothing_and_optional_inputs_are_left_out() -> None:
    open_dim = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, -1]}]}
    assert smoke_inputs(open_dim, {"max_batch_size": 0}) is None
    # Without batching, a leading -1 is a real open dimension, not the batch.
    assert smoke_inputs({"inputs": [{"name": "x", "datatype": "INT64", "shape": [-1, 4]}]}, {}) is None
    huge = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [SMOKE_MAX_ELEMENTS + 1]}]}
    assert smoke_inputs(huge, {}) is None
    both = {
        "inputs": [
            {"name": "ids", "datatype": "INT64", "shape": [4]},
            {"name": "mask", "datatype": "INT64", "shape": [-1]},
        ]
    }
    config = {"input": [{"name": "mask", "optional": True}]}
    assert [i["name"] for i in smoke_inputs(both, config) or []] == ["ids"]


def test_a_failed_load_is_explained_by_the_servers_error_lines_for_that_model(tmp_path: Path) -> None:
    log = tmp_path / "tritonserver.log"
    log.write_text("E1201 23:00:00.000001 1 x.cc:1] \"an earlier failure of 'm@u1'\"\n")
    offset = log.stat().st_size
    with log.open("a") as f:
        f.write('I1201 23:18:51.000001 31583 model_lifecycle.cc:472] "loading: m@u1:1"\n')
        f.write('E1201 23:18:51.216326 31583 model_repository_manager.cc:1460] "Poll failed for model ')
        f.write("directory 'm@u1': failed to read text proto from /r/m@u1/config.pbtxt\"\n")
        f.write('E1201 23:18:51.300000 31583 x.cc:2] "other-model broke"\n')
    assert _logged_errors(log, offset, "m@u1") == (
        "Poll failed for model directory 'm@u1': failed to read text proto from /r/m@u1/config.pbtxt"
    )
    assert _logged_errors(tmp_path / "missing.log", 0, "m@u1") == ""
