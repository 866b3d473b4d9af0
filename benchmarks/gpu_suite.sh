#!/usr/bin/env bash
# GPU figures for docs/benchmarks.md in as few device minutes as possible (not a test). Each part runs under its own
# time limit and logs to $LOGS/<part>.log, so one slow or failing part does not cost the others.
#
#   bash benchmarks/gpu_suite.sh env        # versions, the device, imports (fails fast: run it first)
#   bash benchmarks/gpu_suite.sh encoder    # PGE step JAX vs PyTorch (both on the GPU), batch 1 and 8
#   bash benchmarks/gpu_suite.sh dladiff    # ADFT steps at 512 px batch 4, float32 vs bfloat16 (time + device peak)
#   bash benchmarks/gpu_suite.sh tdae       # InstructPix2Pix 512 px: host / +FDM(fd) / +FDM(exact) s/it
#
# LOGS defaults to $OUT (the device tool's return folder) or ./gpu_logs. Extra python path: $PYTHONPATH.
set -u
LOGS=${LOGS:-${OUT:-gpu_logs}}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}  # torch shares the GPU in `encoder`
status=0

part() {  # part NAME SECONDS CMD...: one benchmark under a time limit, logged
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOGS/$name.log"
  local t0=$SECONDS
  timeout --signal=KILL "$limit" "$@" >>"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOGS/$name.log"
  grep -E '^\||^# (per epoch|peak|[0-9]+px:|jax:|versions)|^#   .*(compile|s/it)|Error|error:' "$LOGS/$name.log" | tail -40
  [ "$rc" -eq 0 ] || status=1
}

for what in "$@"; do
  case $what in
    env)
      part env 120 python3 -c "
import jax, flax, optax, diffusers, transformers, torch
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)
print('diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__,
      torch.cuda.get_device_name(0))
from transformers import FlaxCLIPTextModel
import tdae_jax.models.surrogate, tdae_jax.defenses.tdae, tdae_jax.defenses.dladiff.adft
print('imports ok')"
      ;;
    encoder)
      part encoder_b1 150 python3 benchmarks/step_bench.py encoder --platform cuda --torch-device cuda \
        --sizes 256 512 --batch 1 --warmup 3 --iters 10
      part encoder_b8 120 python3 benchmarks/step_bench.py encoder --platform cuda --torch-device cuda \
        --sizes 512 --batch 8 --warmup 2 --iters 6
      ;;
    dladiff)
      # the two PGD steps compile in ~100 s together; the AdamW step's compile did not finish inside 170 s
      for dt in float32 bfloat16; do
        part "adft_$dt" 170 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python3 benchmarks/adft_bench.py --platform cuda \
          --arch sd21 --size 512 --batch 4 --iters 3 --mem-efficient-attention --dtype "$dt"
      done
      ;;
    tdae)
      # pge only: the sa host's step compiles in 85 s on an H200 and did not reach its timing in 170 s
      part tdae_ip2p 150 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python3 benchmarks/step_bench.py tdae --platform cuda \
        --arch ip2p --size 512 --hosts pge --variants host fd exact --warmup 1 --iters 5
      ;;
    *) echo "unknown part: $what" >&2; status=2 ;;
  esac
done
exit $status
