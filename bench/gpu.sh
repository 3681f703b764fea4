#!/usr/bin/env bash
# The GPU half of bench/distill_throughput.py, for a machine with PyTorch and torchvision but no pydantic
# (worker/engine/config.py needs it) and no network.
#   bench/gpu.sh fetch   where PyPI is reachable: pydantic and its dependencies as wheels for CPython 3.12 on
#                        x86-64 Linux (the GPU image's Python; PYTHON_VERSION=3.x for another) into bench/wheels/
#   bench/gpu.sh         on the GPU machine, in a copy of the repository that holds bench/wheels/: installs them
#                        into a temporary folder if pydantic is missing, then prints one JSON line per variant.
# Exits non-zero if anything fails or the engine misses issue 7's targets (the JSON lines are printed first).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=bench/wheels
python=${PYTHON:-python3}

if [[ "${1:-}" == fetch ]]; then
    version=$(.venv/bin/python -c 'import pydantic; print(pydantic.VERSION)')  # the version the tests ran with
    exec .venv/bin/python -m pip download --quiet --only-binary=:all: --implementation cp \
        --python-version "${PYTHON_VERSION:-3.12}" --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$wheels" "pydantic==$version"
fi

if ! "$python" -c 'import pydantic' 2>/dev/null; then
    site=$(mktemp -d)
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"'
PYTHONUNBUFFERED=1 exec "$python" bench/distill_throughput.py --device cuda --repeats 2 --check
