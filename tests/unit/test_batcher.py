"""The batching policy's pure parts (workers/batcher.py): what a model's config makes of it,
which requests share an execution, and how a batch's outputs go back to its requests."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from natron.errors import InternalError
from natron.inference import InferRequest, Tensor
from natron.spec import ModelSpec
from workers.batcher import (
    LINGERS_BEFORE_SKIPPING,
    PROBE_EVERY,
    Admitted,
    Batcher,
    BatchPolicy,
    group,
    join,
    split,
)


def spec(max_batch_size: int, preferred: tuple[int, ...] = (), delay_us: int = 0) -> ModelSpec:
    return ModelSpec("m", max_batch_size, {}, {}, bool(delay_us or preferred), preferred, delay_us, False)


def item(
    request_id: str, rows: int, width: int = 4, datatype: str = "FP32", *, extra: bool = False
) -> Admitted:
    data = np.full(
        (rows, width), float(len(request_id)), dtype=np.float32 if datatype == "FP32" else np.int32
    )
    inputs = [Tensor("X", datatype, (rows, width), data)]
    if extra:
        inputs.append(Tensor("Y", "FP32", (rows, 1), np.zeros((rows, 1), np.float32)))
    return Admitted(None, "reply", InferRequest(request_id, "m", "1", inputs), rows)  # type: ignore[arg-type]


def ids(groups: list[list[Admitted]]) -> list[list[str]]:
    return [[i.request.id for i in g] for g in groups]


def test_a_batching_model_takes_up_to_max_batch_size_and_lingers_for_its_largest_preferred_size() -> None:
    policy = BatchPolicy.for_model(spec(32, preferred=(4, 8), delay_us=500))
    assert policy == BatchPolicy(max_items=32, enough=8, max_queue_delay_s=0.0005, max_rows=32)


def test_without_preferred_sizes_a_batch_is_enough_at_max_batch_size() -> None:
    assert BatchPolicy.for_model(spec(16, delay_us=100)).enough == 16


def test_a_preferred_size_over_max_batch_size_is_capped() -> None:
    assert BatchPolicy.for_model(spec(8, preferred=(64,))).enough == 8


def test_a_model_that_does_not_batch_takes_one_request_at_a_time() -> None:
    policy = BatchPolicy.for_model(spec(0, delay_us=100))
    assert (policy.max_items, policy.enough, policy.max_rows) == (1, 1, 0)


def test_requests_of_the_same_shape_share_an_execution_in_arrival_order() -> None:
    items = [item("a", 1), item("b", 2), item("c", 1)]
    assert ids(group(items, 8)) == [["a", "b", "c"]]


def test_requests_whose_non_batch_shapes_or_datatypes_differ_never_share_an_execution() -> None:
    items = [item("a", 1), item("b", 1, width=5), item("c", 1), item("d", 1, datatype="INT32"), item("e", 1)]
    assert ids(group(items, 8)) == [["a", "c", "e"], ["b"], ["d"]]


def test_requests_with_different_inputs_never_share_an_execution() -> None:
    assert ids(group([item("a", 1), item("b", 1, extra=True)], 8)) == [["a"], ["b"]]


def test_an_execution_holds_at_most_max_rows() -> None:
    items = [item("a", 3), item("b", 3), item("c", 2), item("d", 1), item("e", 4)]
    assert ids(group(items, 6)) == [["a", "b"], ["c", "d"], ["e"]]


def test_without_batching_every_request_runs_alone() -> None:
    assert ids(group([item("a", 1), item("b", 1)], 0)) == [["a"], ["b"]]


def test_joined_inputs_hold_every_request_s_rows_in_order() -> None:
    feeds = join([item("a", 1), item("bb", 2)])
    np.testing.assert_array_equal(feeds["X"][:, 0], [1.0, 2.0, 2.0])


def test_a_batch_of_one_is_passed_on_without_a_copy() -> None:
    one = item("a", 2)
    assert join([one])["X"] is one.request.inputs[0].data


def test_split_outputs_are_views_of_each_request_s_rows() -> None:
    output = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)
    parts = split(output, [1, 3, 2], model="m", name="OUT")
    assert [p.shape for p in parts] == [(1, 2), (3, 2), (2, 2)]
    assert all(np.shares_memory(p, output) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), output)


@pytest.mark.parametrize("shape", [(5, 2), (7, 2), ()])
def test_an_output_whose_batch_dimension_does_not_match_the_rows_is_a_model_error(
    shape: tuple[int, ...],
) -> None:
    with pytest.raises(InternalError, match="expected a batch dimension of 6"):
        split(np.zeros(shape, np.float32), [1, 3, 2], model="m", name="OUT")


class ScriptedPuller:
    """The puller's side the batcher sees: one request per round, and during each linger as
    many more as the script says for that round (0 when the script has run out)."""

    capacity = 64
    closed = False

    def __init__(self, arrivals_per_linger: list[int]) -> None:
        self._script = list(arrivals_per_linger)
        self._held: list[object] = []
        self._coming = 0
        self.lingers = 0

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def oldest_arrival_s(self) -> float:
        return asyncio.get_running_loop().time()

    async def wait_first(self) -> bool:
        self._held.append(object())
        return True

    async def collect_waiting(self, room: int) -> None:
        pass

    async def pull_until(self, room: int, until_s: float) -> None:
        self.lingers += 1
        self._coming = self._script.pop(0) if self._script else 0

    async def wait_delivery(self, until_s: float) -> None:
        if self._coming:
            self._held.extend(object() for _ in range(self._coming))
            self._coming = 0
            return
        await asyncio.sleep(max(0.0, until_s - asyncio.get_running_loop().time()))

    def hand_over(self, room: int) -> list[object]:
        handed, self._held = self._held, []
        return handed


def rounds(puller: ScriptedPuller, count: int) -> list[int]:
    batcher = Batcher(puller, BatchPolicy.for_model(spec(64, delay_us=100)))  # type: ignore[arg-type]

    async def run() -> list[int]:
        return [len(await batcher.next()) for _ in range(count)]

    return asyncio.run(run())


def test_lingers_that_gather_nobody_are_skipped_but_probed_every_eighth_round() -> None:
    puller = ScriptedPuller([])
    sizes = rounds(puller, 3 + 8 * 4)
    assert sizes == [1] * (3 + 8 * 4)
    # Three fruitless lingers, then one per PROBE_EVERY rounds.
    assert puller.lingers == LINGERS_BEFORE_SKIPPING + 4 == 3 + (8 * 4) // PROBE_EVERY


def test_a_linger_that_gathers_company_restores_lingering_every_round() -> None:
    # Three fruitless lingers, skipping until the probe, whose linger gathers two; from then on
    # every round lingers while company keeps coming.
    puller = ScriptedPuller([0, 0, 0, 2, 1, 1, 1])
    sizes = rounds(puller, 3 + PROBE_EVERY + 3)
    assert sizes[: 3 + PROBE_EVERY - 1] == [1] * (3 + PROBE_EVERY - 1)
    assert sizes[3 + PROBE_EVERY - 1 :] == [3, 2, 2, 2]
    assert puller.lingers == 3 + 1 + 3


def test_without_a_delay_the_batcher_never_lingers() -> None:
    puller = ScriptedPuller([5, 5])
    batcher = Batcher(puller, BatchPolicy.for_model(spec(64)))  # type: ignore[arg-type]

    async def run() -> list[int]:
        return [len(await batcher.next()) for _ in range(4)]

    assert asyncio.run(run()) == [1, 1, 1, 1]
    assert puller.lingers == 0
