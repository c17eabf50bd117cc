"""`natron analyze`: Model Analyzer's search for natron. It loads a model under candidate
configurations through the repository API, drives load with natron.perf, and reports
throughput against latency and memory, per device kind of the fleet."""
