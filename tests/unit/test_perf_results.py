"""natron perf's arithmetic: nearest-rank percentiles, latency summaries, the statistics
extension's deltas, perf_analyzer's CSV row, the request tensors and the target's URLs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from natron.perf.load import build_inputs, check_structure, is_stable, server_deltas
from natron.perf.protocols import InputSpec, ModelInfo, decode_kserve, kserve_inputs, model_info
from natron.perf.results import (
    CSV_COLUMNS,
    MAX_ERROR_SAMPLES,
    OTHER_ERRORS,
    Measurement,
    PerfError,
    count_error,
    csv_header,
    latency_summary,
    percentile,
)
from natron.perf.target import Target

pytestmark = pytest.mark.unit

SIMPLE = ModelInfo(
    "simple",
    "1",
    8,
    (InputSpec("INPUT0", "INT32", (16,)), InputSpec("INPUT1", "INT32", (16,))),
    (("OUTPUT0", "INT32"), ("OUTPUT1", "INT32")),
)


# -- percentiles ------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank_observed_values() -> None:
    hundred = [float(i) for i in range(1, 101)]
    assert [percentile(hundred, p) for p in (1, 50, 90, 99, 100)] == [1.0, 50.0, 90.0, 99.0, 100.0]
    four = [10.0, 20.0, 30.0, 40.0]
    assert percentile(four, 50) == 20.0  # not 25: never between two requests
    assert percentile(four, 51) == 30.0
    assert percentile(four, 95) == 40.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 99) == 0.0


@pytest.mark.parametrize("p", [0, -1, 100.5])
def test_a_percentile_outside_0_to_100_is_refused(p: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], p)


@given(
    st.lists(st.floats(min_value=0, max_value=1e7, allow_nan=False), min_size=1, max_size=300),
    st.integers(min_value=1, max_value=100),
)
def test_percentile_agrees_with_numpys_inverted_cdf(values: list[float], p: int) -> None:
    assert percentile(sorted(values), p) == pytest.approx(np.percentile(values, p, method="inverted_cdf"))


def test_latency_summary_has_the_average_the_standard_percentiles_and_the_asked_one() -> None:
    summary = latency_summary([4.0, 1.0, 3.0, 2.0], extra=[75])
    assert set(summary) == {"avg", "p50", "p75", "p90", "p95", "p99"}
    assert summary["avg"] == 2.5
    assert (summary["p50"], summary["p75"], summary["p99"]) == (2.0, 3.0, 4.0)
    assert latency_summary([])["avg"] == 0.0


# -- error samples, server deltas, the CSV row --------------------------------------------------


def test_error_samples_keep_first_lines_and_a_bounded_number_of_texts() -> None:
    samples: dict[str, int] = {}
    count_error(samples, "HTTP 503: overloaded\nmore detail")
    count_error(samples, "HTTP 503: overloaded")
    assert samples == {"HTTP 503: overloaded": 2}
    for i in range(MAX_ERROR_SAMPLES * 2):
        count_error(samples, f"distinct {i}")
    assert len(samples) == MAX_ERROR_SAMPLES + 1
    assert samples[OTHER_ERRORS] == MAX_ERROR_SAMPLES + 1
    assert sum(samples.values()) == 2 + MAX_ERROR_SAMPLES * 2


def test_server_deltas_are_per_request_averages_in_microseconds() -> None:
    before = {"success_count": 10, "success_ns": 0, "queue_count": 10, "queue_ns": 1_000_000}
    after = {
        "success_count": 110,
        "success_ns": 0,
        "queue_count": 110,
        "queue_ns": 21_000_000,  # 20 ms over 100 requests
        "compute_infer_count": 100,
        "compute_infer_ns": 50_000_000,
    }
    deltas = server_deltas(before, after)
    assert deltas == {"success": 100, "queue_us": 200.0, "compute_infer_us": 500.0}
    assert server_deltas(None, after) == {}
    assert server_deltas(before, None) == {}


def measurement(**changes: object) -> Measurement:
    fields: dict[str, object] = {
        "mode": "concurrency",
        "load": 4.0,
        "duration_s": 2.0,
        "requests": 200,
        "errors": 0,
        "error_samples": {},
        "throughput_per_s": 100.0,
        "latency_us": {"avg": 1000.0, "p50": 900.0, "p90": 1500.0, "p95": 1800.0, "p99": 2500.4},
        "server": {
            "success": 200,
            "queue_us": 100.0,
            "compute_input_us": 10.0,
            "compute_infer_us": 300.0,
            "compute_output_us": 20.0,
        },
        "client_send_us": 5.0,
        "client_recv_us": 15.0,
    }
    fields.update(changes)
    return Measurement(**fields)  # type: ignore[arg-type]


def test_the_csv_row_has_perf_analyzers_columns_in_microseconds() -> None:
    row = measurement().csv_row()
    assert list(row) == csv_header("concurrency")
    assert csv_header("concurrency") == ["Concurrency", *CSV_COLUMNS]
    assert row["Concurrency"] == 4
    assert row["Inferences/Second"] == 100.0
    assert (row["Server Queue"], row["Server Compute Infer"], row["p99 latency"]) == (100, 300, 2500)
    # What is left of the average once the client's and the server's parts are taken out.
    assert row["Network+Server Send/Recv"] == 1000 - 5 - 15 - (100 + 10 + 300 + 20)
    assert (row["Client Send"], row["Client Recv"], row["Avg latency"]) == (5, 15, 1000)


def test_without_server_statistics_the_server_columns_stay_empty_not_zero() -> None:
    row = measurement(server={}, mode="request_rate", load=250.0).csv_row()
    assert next(iter(row)) == "Request Rate" and row["Request Rate"] == 250.0
    assert [row[c] for c in ("Server Queue", "Server Compute Input", "Server Compute Infer")] == ["", "", ""]
    assert row["Network+Server Send/Recv"] == 1000 - 5 - 15


# -- the request tensors ------------------------------------------------------------------------


def test_inputs_get_the_batch_dimension_and_the_configs_datatypes() -> None:
    inputs = build_inputs(SIMPLE, Target("localhost:8000", "http", "simple", batch_size=3))
    assert list(inputs) == ["INPUT0", "INPUT1"]
    for datatype, array in inputs.values():
        assert datatype == "INT32" and array.dtype == np.int32 and array.shape == (3, 16)
    zeros = build_inputs(SIMPLE, Target("localhost:8000", "http", "simple", input_data="zero"))
    assert not zeros["INPUT0"][1].any()


def test_variable_dims_need_a_shape_that_fits() -> None:
    info = ModelInfo("v", "1", 0, (InputSpec("X", "BYTES", (-1, 4)),), (("Y", "BYTES"),))
    with pytest.raises(PerfError, match=r"variable dims \[-1,4\]: give them with --shape X"):
        build_inputs(info, Target("h:1", "http", "v"))
    with pytest.raises(PerfError, match="does not fit"):
        build_inputs(info, Target("h:1", "http", "v", shapes={"X": (2, 5)}))
    with pytest.raises(PerfError, match="names no input of model 'v': Z"):
        build_inputs(info, Target("h:1", "http", "v", shapes={"Z": (1,)}))
    datatype, array = build_inputs(info, Target("h:1", "http", "v", shapes={"X": (2, 4)}))["X"]
    assert datatype == "BYTES" and array.shape == (2, 4)  # no batch dim: max_batch_size 0
    assert all(isinstance(x, bytes) and len(x) == 128 for x in array.ravel())


def test_batch_sizes_the_model_cannot_take_are_refused() -> None:
    with pytest.raises(PerfError, match="over the max_batch_size 8"):
        build_inputs(SIMPLE, Target("h:1", "http", "simple", batch_size=9))
    unbatched = ModelInfo("u", "1", 0, SIMPLE.inputs, SIMPLE.outputs)
    with pytest.raises(PerfError, match="does not batch"):
        build_inputs(unbatched, Target("h:1", "http", "u", batch_size=2))


def test_an_answer_missing_an_output_or_its_batch_is_wrong() -> None:
    good = {"OUTPUT0": np.zeros((2, 16)), "OUTPUT1": np.zeros((2, 16))}
    assert check_structure(SIMPLE, 2, good) is None
    assert "'OUTPUT1' missing" in str(check_structure(SIMPLE, 2, {"OUTPUT0": good["OUTPUT0"]}))
    assert "expected a batch of 3" in str(check_structure(SIMPLE, 3, good))


def test_kserve_binary_and_json_tensors_decode_back_to_what_was_encoded() -> None:
    inputs = build_inputs(SIMPLE, Target("h:1", "http", "simple", batch_size=2))
    for binary in (True, False):
        docs, data = kserve_inputs(inputs, binary)
        # An answer laid out as a request is: the same documents, then the same bytes.
        as_outputs = [{**doc, "name": doc["name"].replace("IN", "OUT")} for doc in docs]
        decoded = decode_kserve({"outputs": as_outputs}, memoryview(data))
        np.testing.assert_array_equal(decoded["OUTPUT0"], inputs["INPUT0"][1])
        np.testing.assert_array_equal(decoded["OUTPUT1"], inputs["INPUT1"][1])


def test_fp16_cannot_go_as_json() -> None:
    info = ModelInfo("h", "1", 0, (InputSpec("X", "FP16", (2,)),), ())
    inputs = build_inputs(info, Target("h:1", "http", "h"))
    with pytest.raises(PerfError, match="FP16, which JSON cannot carry"):
        kserve_inputs(inputs, binary=False)


def test_model_info_reads_tritons_json_config_with_grpcs_string_dims() -> None:
    config = {
        "max_batch_size": "8",
        "input": [{"name": "A", "data_type": "TYPE_STRING", "dims": ["-1"]}],
        "output": [{"name": "B", "data_type": "TYPE_FP32", "dims": ["3"]}],
    }
    info = model_info("m", "2", config)
    assert info == ModelInfo("m", "2", 8, (InputSpec("A", "BYTES", (-1,)),), (("B", "FP32"),))
    with pytest.raises(PerfError, match="no inputs"):
        model_info("m", "1", {"output": []})
    with pytest.raises(PerfError, match="cannot read"):
        model_info("m", "1", {"input": [{"name": "A", "data_type": "TYPE_NOPE", "dims": [1]}]})


# -- targets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "protocol", "expected"),
    [
        ("localhost:8000", "http", "http://localhost:8000"),
        ("http://10.0.0.1", "http", "http://10.0.0.1:8000"),
        ("127.0.0.1:8001", "grpc", "grpc://127.0.0.1:8001"),
        ("grpc://h", "grpc", "grpc://h:8001"),
        ("http://h:9000", "ws", "ws://h:9000"),
        ("h:9000", "ws", "ws://h:9000"),
        ("nats://a:1, nats://b", "nats", "nats://a:1,nats://b:4222"),
    ],
)
def test_urls_take_perf_analyzers_bare_host_port_and_the_protocols_scheme(
    url: str, protocol: str, expected: str
) -> None:
    assert Target(url, protocol, "m").url == expected


def test_the_statistics_default_to_the_http_endpoint_of_http_and_ws_targets() -> None:
    assert Target("h:1", "ws", "m").statistics_base == "http://h:1"
    assert Target("h:1", "http", "m").statistics_base == "http://h:1"
    assert Target("h:1", "grpc", "m").statistics_base == ""
    assert Target("nats://h:1", "nats", "m", stats_url="h:2").statistics_base == "http://h:2"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "http://h:1", "protocol": "grpc"}, "does not fit protocol grpc"),
        ({"url": "h:1", "protocol": "smtp"}, "unknown protocol 'smtp'"),
        ({"url": "h:notaport", "protocol": "http"}, "bad port"),
        ({"url": "h:1", "protocol": "http", "batch_size": 0}, "batch size must be at least 1"),
        ({"url": "h:1", "protocol": "http", "timeout_s": 0}, "timeout must be positive"),
        ({"url": "h:1", "protocol": "http", "input_data": "ones"}, "input data must be one of"),
        ({"url": "nats://h", "protocol": "nats", "prefix": "a.b"}, "invalid prefix name 'a.b'"),
        ({"url": " , ", "protocol": "nats"}, "no NATS server"),
    ],
)
def test_bad_targets_are_refused_naming_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PerfError, match=message):
        Target(model="m", **kwargs)  # type: ignore[arg-type]


# -- the stability rule ------------------------------------------------------------------------


def windows(*points: tuple[float, float]) -> list[Measurement]:
    """Windows of (throughput, average latency µs)."""
    return [measurement(throughput_per_s=t, latency_us={"avg": lat, "p99": 2 * lat}) for t, lat in points]


def test_three_windows_are_stable_when_each_lies_within_the_fraction_of_their_mean() -> None:
    # Mean throughput 100: 91 and 109 are within 10%, 89 is not.
    assert is_stable(windows((91, 1000), (100, 1000), (109, 1000)), 0.10, "avg")
    assert not is_stable(windows((89, 1000), (100, 1000), (111, 1000)), 0.10, "avg")
    # Latency counts as much as throughput, by the key asked for.
    assert not is_stable(windows((100, 800), (100, 1000), (100, 1200)), 0.10, "avg")
    assert is_stable(windows((100, 800), (100, 1000), (100, 1200)), 0.25, "p99")
    # Windows that all measured nothing agree; one that measured something among them does not.
    assert is_stable(windows((0, 0), (0, 0), (0, 0)), 0.10, "avg")
    assert not is_stable(windows((0, 0), (0, 0), (30, 1000)), 0.10, "avg")
