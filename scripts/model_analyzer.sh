#!/usr/bin/env bash
# Triton's Model Analyzer, unchanged, profiling a model that `natron serve` serves: its remote
# mode, with its default client (gRPC) and perf_analyzer. Model Analyzer loads each candidate
# config through the repository API (a config override), so natron runs in explicit mode.
#
#     scripts/model_analyzer.sh REPO MODEL [model-analyzer profile flags...]
#
# Installs Model Analyzer into .venv-triton beside perf_analyzer (scripts/install_triton.sh).
# The search is kept small (concurrency up to 4, up to 2 instances, batch up to 4) and the
# model is profiled as CPU-only: Model Analyzer's default instance groups are KIND_GPU, which a
# fleet without GPU workers refuses, as Triton without a GPU does. Reports go to
# bench/results/model-analyzer/ (HTML summary and detailed reports, PNG plots, CSV).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRITON_VENV:-$ROOT/.venv-triton}"
REPO="$(cd "${1:?usage: $0 REPO MODEL [flags]}" && pwd)"
MODEL="${2:?usage: $0 REPO MODEL [flags]}"
shift 2
OUT="$ROOT/bench/results/model-analyzer"

"$ROOT/scripts/install_triton.sh"
[ -x "$VENV/bin/model-analyzer" ] || "$VENV/bin/python" -m pip install --quiet triton-model-analyzer

read -r HTTP GRPC METRICS NATS < <("$ROOT/.venv/bin/python" -c \
    'from broker.server import free_ports; print(*free_ports(4))')
rm -rf "$OUT" && mkdir -p "$OUT"
"$ROOT/.venv/bin/natron" serve "$REPO" --model-control-mode explicit --load-model "$MODEL" \
    --http-address 127.0.0.1 --http-port "$HTTP" --grpc-address 127.0.0.1 --grpc-port "$GRPC" \
    --metrics-port "$METRICS" --nats-port "$NATS" > "$OUT/natron.log" 2>&1 &
SERVE=$!
trap 'kill -INT $SERVE 2>/dev/null; wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$HTTP/v2/health/ready" >/dev/null && break
    sleep 1
done

printf 'profile_models:\n  %s:\n    cpu_only: true\n' "$MODEL" > "$OUT/profile.yaml"
PATH="$VENV/bin:$PATH" \
LD_LIBRARY_PATH="$VENV/lib/python3.11/site-packages/nvidia/cuda_runtime/lib" \
    "$VENV/bin/model-analyzer" profile -m "$REPO" -f "$OUT/profile.yaml" \
    --triton-launch-mode remote \
    --triton-http-endpoint "127.0.0.1:$HTTP" --triton-grpc-endpoint "127.0.0.1:$GRPC" \
    --triton-metrics-url "http://127.0.0.1:$METRICS/metrics" \
    --output-model-repository-path "$OUT/variants" --override-output-model-repository \
    --export-path "$OUT" --checkpoint-directory "$OUT/checkpoints" \
    --run-config-search-max-concurrency 4 --run-config-search-max-instance-count 2 \
    --run-config-search-max-model-batch-size 4 "$@"
echo "reports: $OUT/reports, measurements: $OUT/results/metrics-model-inference.csv"
