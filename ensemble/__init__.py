"""The orchestrator for `platform: "ensemble"` models: `natron ensemble` is a worker whose only
backend chains the steps of an ensemble by sending each step's request through the mesh to the
step model's subject, so composing models keep their own batching and run wherever they run."""
