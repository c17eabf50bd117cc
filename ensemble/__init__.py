"""The orchestrator for `platform: "ensemble"` models (not built yet: ensembles are listed
UNAVAILABLE by the router with the reason)."""
