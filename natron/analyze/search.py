"""How candidates are chosen, and how a measured one is scored against the user's constraints.

- **brute**: every point of the space, in order, when the space fits in `max_configs`.
- **quick**: coordinate descent, as Model Analyzer's quick search: from the point nearest the
  model's own config, sweep one dimension at a time with the others fixed, move to the best value
  found, and go round the dimensions again until a full round improves nothing or the budget of
  configs is spent. It finds a good config in a few configs per dimension instead of their product.

Scoring: a config's load points (concurrency levels) are feasible when they meet the latency
budget (p99) and the minimum throughput, and the config's memory meets `max_memory_mb`. The
objective picks among feasible points: the highest throughput, or the lowest p99.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from natron.analyze.space import Point, Space

THROUGHPUT = "throughput"
LATENCY = "latency"


@dataclass(frozen=True, slots=True)
class Constraints:
    latency_budget_ms: float | None = None
    min_throughput: float | None = None
    max_memory_mb: float | None = None
    objective: str = THROUGHPUT

    def describe(self) -> str:
        parts = []
        if self.latency_budget_ms is not None:
            parts.append(f"p99 <= {self.latency_budget_ms:g} ms")
        if self.min_throughput is not None:
            parts.append(f"throughput >= {self.min_throughput:g} infer/s")
        if self.max_memory_mb is not None:
            parts.append(f"memory <= {self.max_memory_mb:g} MB")
        return ", ".join(parts) or "none"


@dataclass(slots=True)
class LoadPoint:
    """One measured load level of a config."""

    concurrency: int  # 0 in request-rate mode
    throughput_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float
    errors: int = 0
    server_queue_us: float = 0.0
    server_compute_us: float = 0.0
    request_rate: float = 0.0  # the rate asked, in request-rate mode
    # natron perf's stability rule on p99 (None: one window, not checked) and the windows taken.
    stable: bool | None = None
    windows: int = 1

    @property
    def load(self) -> str:
        """The load level as the user set it: a concurrency, or a request rate."""
        return f"{self.request_rate:g}/s" if self.request_rate else str(self.concurrency)

    @property
    def order(self) -> float:
        return self.request_rate or float(self.concurrency)


@dataclass(slots=True)
class Candidate:
    """A config as measured: its load points, its memory, and the verdict."""

    name: str
    device: str
    settings: dict[str, str]
    config: dict[str, object]
    points: list[LoadPoint] = field(default_factory=list)
    # Per worker of the device class, the largest seen while it ran: host RSS, device memory.
    rss_mb: float = 0.0
    gpu_mb: float = 0.0
    failure: str = ""  # why it could not be measured (a config the server refused to load)
    workers: int = 1

    @property
    def memory_mb(self) -> float:
        """What runs out first on the class's device: GPU memory on a GPU, else host memory."""
        return self.gpu_mb if self.gpu_mb else self.rss_mb

    def feasible(self, constraints: Constraints) -> list[LoadPoint]:
        if self.failure:
            return []
        if constraints.max_memory_mb is not None and self.memory_mb > constraints.max_memory_mb:
            return []
        chosen = []
        for point in self.points:
            if point.errors:
                continue
            if constraints.latency_budget_ms is not None and point.p99_ms > constraints.latency_budget_ms:
                continue
            if constraints.min_throughput is not None and point.throughput_per_s < constraints.min_throughput:
                continue
            chosen.append(point)
        return chosen

    def best_point(self, constraints: Constraints) -> LoadPoint | None:
        """The point the objective picks among the feasible ones."""
        feasible = self.feasible(constraints)
        if not feasible:
            return None
        if constraints.objective == LATENCY:
            return min(feasible, key=lambda p: (p.p99_ms, -p.throughput_per_s))
        return max(feasible, key=lambda p: (p.throughput_per_s, -p.p99_ms))

    def score(self, constraints: Constraints) -> float | None:
        """Higher is better; None when no point is feasible."""
        best = self.best_point(constraints)
        if best is None:
            return None
        return -best.p99_ms if constraints.objective == LATENCY else best.throughput_per_s

    @staticmethod
    def _miss(point: LoadPoint, constraints: Constraints) -> float:
        """How far one level is from the constraints, relatively (0: it meets them)."""
        miss = 0.0 if not point.errors else 1.0
        if constraints.latency_budget_ms is not None and point.p99_ms > constraints.latency_budget_ms:
            miss += point.p99_ms / constraints.latency_budget_ms - 1
        if constraints.min_throughput is not None and point.throughput_per_s < constraints.min_throughput:
            miss += 1 - point.throughput_per_s / constraints.min_throughput
        return miss

    def nearest_point(self, constraints: Constraints) -> LoadPoint | None:
        """The level that misses the constraints by least: what "the closest" shows."""
        if not self.points:
            return None
        return min(self.points, key=lambda p: self._miss(p, constraints))

    def closeness(self, constraints: Constraints) -> float:
        """How far its nearest level is from feasible, for "the closest" when nothing is."""
        nearest = None if self.failure else self.nearest_point(constraints)
        if nearest is None:
            return float("inf")
        miss = self._miss(nearest, constraints)
        if constraints.max_memory_mb is not None and self.memory_mb > constraints.max_memory_mb:
            miss += self.memory_mb / constraints.max_memory_mb - 1
        return miss


Evaluate = Callable[[Point], Awaitable[Candidate]]


def choose_strategy(space: Space, max_configs: int, asked: str) -> str:
    if asked != "auto":
        return asked
    return "brute" if space.size <= max_configs else "quick"


async def brute(space: Space, evaluate: Evaluate, max_configs: int) -> dict[Point, Candidate]:
    measured: dict[Point, Candidate] = {}
    for point in space.points():
        if len(measured) >= max_configs:
            break
        measured[point] = await evaluate(point)
    return measured


async def quick(
    space: Space, evaluate: Evaluate, max_configs: int, constraints: Constraints
) -> dict[Point, Candidate]:
    """Coordinate descent over the dimensions, within `max_configs` configs."""
    measured: dict[Point, Candidate] = {}

    def value(point: Point) -> tuple[int, float]:
        # Feasible beats infeasible; among infeasible, the closer the better.
        candidate = measured[point]
        score = candidate.score(constraints)
        if score is not None:
            return (1, score)
        return (0, -candidate.closeness(constraints))

    current = space.start()
    measured[current] = await evaluate(current)
    improved = True
    while improved and len(measured) < max_configs:
        improved = False
        for axis, dimension in enumerate(space.dimensions):
            for index in range(len(dimension.values)):
                if len(measured) >= max_configs:
                    break
                point = (*current[:axis], index, *current[axis + 1 :])
                if point not in measured:
                    measured[point] = await evaluate(point)
            best = max(
                (p for p in measured if p[:axis] == current[:axis] and p[axis + 1 :] == current[axis + 1 :]),
                key=value,
            )
            if best != current and value(best) > value(current):
                current = best
                improved = True
    return measured


def winner(candidates: list[Candidate], constraints: Constraints) -> Candidate | None:
    scored = [(c.score(constraints), c) for c in candidates]
    feasible = [(s, c) for s, c in scored if s is not None]
    if not feasible:
        return None
    return max(feasible, key=lambda item: item[0])[1]


def closest(candidates: list[Candidate], constraints: Constraints) -> Candidate | None:
    measured = [c for c in candidates if c.points and not c.failure]
    if not measured:
        return None
    return min(measured, key=lambda c: c.closeness(constraints))
