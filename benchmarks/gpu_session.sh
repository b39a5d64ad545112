#!/usr/bin/env bash
# One GPU session in one command (a lent GPU's time is short and every start costs minutes):
# the GPU kernel tests, then every benchmark, all into a new dated record
# benchmarks/results/<date>-<device>.md, within BUDGET seconds (default 480, under a device
# call's 10 minutes with the start-up): run_all.py shares it between the tests and the scripts,
# issue 17's scripts first, and the record says which were stopped. When $OUT is set (the device
# runner's output folder) the record is copied there too.
#
#   bash benchmarks/gpu_session.sh            # everything
#   bash benchmarks/gpu_session.sh quant mla  # tests + only the scripts whose name has a word
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
"$PYTHON" benchmarks/run_all.py --with-tests --budget "${BUDGET:-480}" "$@"
status=$?
if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/"$(date -u +%Y-%m-%d)"-*.md "$OUT"/ 2>/dev/null || true
fi
exit $status
