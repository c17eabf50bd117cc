"""Subject, stream, consumer, bucket and header names: the mesh's address book.

A configurable prefix (default `natron`) keeps several deployments apart on one NATS cluster.
Model names are validated to be single subject tokens, so no name can address another's
subject, and they are used verbatim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from natron.errors import InvalidArgument

# Letters, digits, '_' and '-': safe as one NATS subject token, a consumer name, a KV key and a
# directory name. Triton allows more, but '.', '*', '>' and whitespace would split or widen a
# subject, so such names are refused at the repository scan with this pattern in the reason.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,127}$")

# Headers of a request message (JetStream owns the message's own reply subject for its acks).
REPLY_TO = "Natron-Reply-To"
# Absolute deadline, unix epoch nanoseconds. A wall clock, because it must mean the same
# instant on every host of the cluster; intervals inside a process use monotonic clocks.
DEADLINE_NS = "Natron-Deadline-Ns"
# Headers of a response message.
STATUS = "Natron-Status"
# Streaming (decoupled models): sequence number of a response and the final marker.
SEQUENCE = "Natron-Seq"
FINAL = "Natron-Final"
# A coalesced stream message: how many answers its body's "responses" list holds.
COUNT = "Natron-Count"

# A coalesced message: on a request, how many requests its body's "requests" list holds; on an
# answer, how many answers its "answers" list holds (docs/wire-format.md).
BATCH = "Natron-Batch"

# The trace extension's triton mode: a request its gateway traces carries TRACE ("1"), and its
# answer carries TIMESTAMPS: the worker's QUEUE_START, COMPUTE_START, COMPUTE_INPUT_END,
# COMPUTE_OUTPUT_START and COMPUTE_END, unix epoch nanoseconds (wall clock, as DEADLINE_NS),
# comma-separated. Untraced requests carry neither.
TRACE = "Natron-Trace"
TIMESTAMPS = "Natron-Timestamps"

# JetStream's own header, echoed for the pull loop's bookkeeping of expired pull requests.
PENDING_MESSAGES = "Nats-Pending-Messages"


def check_name(kind: str, name: str) -> str:
    if not _NAME.match(name):
        raise InvalidArgument(f"invalid {kind} name '{name}': use letters, digits, '_' and '-' (at most 128)")
    return name


@dataclass(slots=True, frozen=True)
class Subjects:
    prefix: str = "natron"

    def __post_init__(self) -> None:
        check_name("prefix", self.prefix)

    # -- inference ---------------------------------------------------------------------------
    @property
    def stream(self) -> str:
        """The work-queue stream that captures every inference request."""
        return f"{self.prefix.upper()}_INFER"

    @property
    def infer_all(self) -> str:
        return f"{self.prefix}.infer.>"

    def infer(self, model: str, version: str, level: int = 0) -> str:
        """Where requests for `model` `version` go; at priority `level` (1, 2, ...) of a model
        with priority levels, one token more (0: the plain subject, which a model with levels
        takes at its default level)."""
        if level:
            return f"{self.prefix}.infer.{model}.{version}.{level}"
        return f"{self.prefix}.infer.{model}.{version}"

    def consumer(self, model: str, version: str, level: int = 0) -> str:
        """The durable pull consumer shared by every instance of one model version; of one
        priority level of it (a model's default level keeps the plain name, 0: no levels)."""
        if level:
            return f"{model}-v{version}-p{level}"
        return f"{model}-v{version}"

    @property
    def cancel_all(self) -> str:
        return f"{self.prefix}.cancel.>"

    def cancel(self, model: str, version: str) -> str:
        """Core NATS: the id of a request whose client went away (body), for its instances."""
        return f"{self.prefix}.cancel.{model}.{version}"

    # -- replies -----------------------------------------------------------------------------
    @property
    def all_inboxes(self) -> str:
        """Every natron service's inboxes (`inbox`), and nothing else's."""
        return f"_INBOX.{self.prefix}.>"

    def inbox(self, owner: str) -> str:
        """A requester's private reply prefix; it subscribes to `inbox + '.>'`."""
        return f"_INBOX.{self.prefix}.{owner}"

    # -- control -----------------------------------------------------------------------------
    @property
    def models_bucket(self) -> str:
        """KV: model name -> its config, version states and reasons (written by the router)."""
        return f"{self.prefix}_models"

    @property
    def workers_bucket(self) -> str:
        """KV: worker id -> its devices, loaded model versions and heartbeat."""
        return f"{self.prefix}_workers"

    @property
    def workers_stream(self) -> str:
        """The stream behind the workers bucket (JetStream names it `KV_<bucket>`)."""
        return f"KV_{self.workers_bucket}"

    @property
    def state_streams(self) -> tuple[str, ...]:
        """The JetStream streams the mesh's state lives in: the inference queue and the streams
        behind the two KV buckets (JetStream names a bucket's stream `KV_<bucket>`). A broker
        that comes back without them has lost that state (see broker.jetstream.watch_state)."""
        return (self.stream, f"KV_{self.models_bucket}", self.workers_stream)

    @property
    def files_bucket(self) -> str:
        """Object store: model versions' files by content, and their manifests
        (broker/objects.py; written by the router and `natron push`, read by workers)."""
        return f"{self.prefix}_files"

    @property
    def settings_bucket(self) -> str:
        """KV: the deployment's shared settings (log, trace) by name (broker/shared_settings.py)."""
        return f"{self.prefix}_settings"

    @property
    def shm_bucket(self) -> str:
        """System shared memory registrations of the gateways, keyed by host and region name."""
        return f"{self.prefix}_shm"

    def ctl(self, verb: str) -> str:
        return f"{self.prefix}.ctl.{verb}"

    @property
    def stats_query(self) -> str:
        """Core NATS, no queue group: a gateway's statistics query, which every worker and
        orchestrator answers with its counts as they are now (natron/stats.py, StatsQuery)."""
        return self.ctl("stats")
