#!/usr/bin/env bash
# Set up, then run the quick start on a bundled demo image with the bundled default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/flawscope --pipeline anomaly_detection --input src/flawscope/assets/demo --save_path output "$@"
