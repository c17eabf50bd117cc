"""Fleet-wide model states from the workers' reports: pure functions the router applies on
every change (and tests call directly)."""

from __future__ import annotations

from natron.records import LOADING, NO_WORKER, READY, UNAVAILABLE, ModelRecord, VersionState, WorkerReport

RELOAD_FAILED = "reload failed, the previous model serves: "


def placed_workers(record: ModelRecord, workers: list[WorkerReport]) -> list[WorkerReport]:
    return [w for w in workers if w.id in record.placement and not w.stopping]


def generation_states(record: ModelRecord, workers: list[WorkerReport]) -> dict[str, list[VersionState]]:
    """What the placed workers report for each version of the record's own generation."""
    placed = placed_workers(record, workers)
    return {
        version: [
            w.models[record.name][record.generation][version]
            for w in placed
            if version in w.models.get(record.name, {}).get(record.generation, {})
        ]
        for version in record.versions
    }


def aggregate(record: ModelRecord, workers: list[WorkerReport]) -> dict[str, VersionState]:
    """Each version's fleet-wide state from the placed workers' reports.

    While a reload is under way, or after it failed, instances of an earlier generation that
    still run on a worker keep the version READY: there is no gap, and a failed reload shows
    its reason next to READY. So does a record that serves on after a load of the model failed
    (its `failure`).
    """
    if record.reason:
        return record.versions
    if not record.placement:
        reason = record.placement_reason or NO_WORKER
        return {v: VersionState(UNAVAILABLE, reason) for v in record.versions}
    placed = placed_workers(record, workers)
    current = generation_states(record, workers)
    states: dict[str, VersionState] = {}
    for version, seen in current.items():
        older_ready = any(
            states_by_version.get(version, VersionState(LOADING)).state == READY
            for w in placed
            for generation, states_by_version in w.models.get(record.name, {}).items()
            if generation != record.generation
        )
        if any(s.state == READY for s in seen):
            states[version] = VersionState(READY, RELOAD_FAILED + record.failure if record.failure else "")
        elif any(s.state == LOADING for s in seen) or len(seen) < len(placed):
            states[version] = VersionState(READY) if older_ready else VersionState(LOADING)
        elif seen:
            reason = seen[0].reason
            if older_ready:
                states[version] = VersionState(READY, RELOAD_FAILED + reason)
            else:
                states[version] = VersionState(UNAVAILABLE, reason)
        else:
            states[version] = VersionState(UNAVAILABLE, NO_WORKER)
    return states


def settle(record: ModelRecord, workers: list[WorkerReport]) -> dict[str, str] | None:
    """How a load of the record's generation ended: None while a placed worker is still at it
    (or has not reported it yet); else the versions that no placed worker could load, each with
    a reason, empty when every version is READY on at least one of them."""
    if not record.placement:
        return {v: record.placement_reason or NO_WORKER for v in record.versions}
    placed = len(placed_workers(record, workers))
    seen = generation_states(record, workers)
    if any(len(states) < placed or any(s.state == LOADING for s in states) for states in seen.values()):
        return None
    return {
        version: next((s.reason for s in states if s.state != READY), NO_WORKER)
        for version, states in seen.items()
        if not any(s.state == READY for s in states)
    }


def gate_ensembles(records: dict[str, ModelRecord], computed: dict[str, dict[str, VersionState]]) -> None:
    """An ensemble is READY only while every composing model has a READY version; nested
    ensembles settle over a few rounds."""
    ensembles = {
        name: [
            s.get("model_name", "") for s in (r.config or {}).get("ensemble_scheduling", {}).get("step", [])
        ]
        for name, r in records.items()
        if r.config and r.config.get("platform") == "ensemble" and not r.reason
    }
    for _ in range(len(ensembles)):
        changed = False
        for name, composing in ensembles.items():
            for model in composing:
                states = computed.get(model)
                if states is not None and any(s.state == READY for s in states.values()):
                    continue
                reason = f"composing model '{model}' is " + (
                    "not ready" if states is not None else "not found"
                )
                for version, state in computed[name].items():
                    if state.state == READY:
                        computed[name][version] = VersionState(UNAVAILABLE, reason)
                        changed = True
        if not changed:
            break
