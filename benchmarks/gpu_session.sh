#!/usr/bin/env bash
# The ONE command a GPU session runs for issue #5's performance figures (one H100 / H200), and its CPU dry run.
#
#   bash benchmarks/gpu_session.sh [--out DIR] [--budget SECONDS]     # GPU; DIR defaults to $OUT
#   bash benchmarks/gpu_session.sh --dry-run [--out DIR]               # the same steps on CPU, tiny configs
#
# Writes into DIR (8 files, the device tool's limit, each well under 16 MiB): session.log (everything printed),
# mmdit_cudnn.json, official_mmdit.json, mmdit_fa3.json, mmdit_cudnn_torch_forms.json, comfy_memory.json,
# mmdit_compiled.json, summary.json; the summary table is printed at the end. Every step runs under `timeout`, capped
# by what is left of --budget (default 540 s, under the device tool's 600 s per command); a failing or timed-out step
# is recorded and the rest run; the exit status is 1 only when no step succeeded. Python: $PYTHON, else .venv/bin/python,
# else python3.
#
# Steps, in priority order, with the estimate on one H200 (the 2026-11-28 runs: official forward 256px b3 1.18 s,
# b1 0.40 s, 768px b1 14.1 s with SDPA's flash kernel, 50-step t2v 59 s; ours eager 1.10 s / 0.36 s / 8.95 s before
# opensora_lib/fused_ops; ~8 s start + 11B build each):
#   1. ours_cudnn  bench_mmdit --attention cudnn: the eager buffered forms (fused_ops included) vs the plain ones
#                  on the GPU (bit-identical?, <1 s), forwards 256px b3/b1 + 768px b1 (~20 s), 50-step t2v
#                  (80 passes, ~30 s) and i2v_head (110 passes, ~40 s)                           ~100 s
#   2. official    official_mmdit (attention: SDPA's flash backend, as published): compile + Liger JIT (~30 s),
#                  forwards (~45 s), the official 50-step t2v (150 passes, ~60 s; its i2v runs the same passes,
#                  so it is not run again), a torch.profiler table of one 256px b3 forward of ours and of it  ~150 s
#   3. ours_fa3    bench_mmdit --attention flash_attn_3 (FlashAttention-3 from the fa3-fwd wheel in .whl/): one
#                  joint attention call per forward size through every backend (sdpa: torch's choice, cuDNN
#                  here; sdpa_flash: SDPA's FlashAttention-2 kernel, the official one; cudnn; flash_attn_3 last),
#                  with the error against float32 attention at 256px, then the forwards and both 50-step runs
#                                                                                                 ~110 s (cap 150)
#   4. ours_torch_forms  the forwards of step 1 with OPENSORA_FUSED_OPS=0: what fused_ops saves   ~40 s
#   5. comfy_memory  bench_comfy_memory (24 GiB partial loading, 10 steps, then the workflow's tiled decode)  ~85 s (cap 150)
#   6. ours_compiled  bench_mmdit --attention cudnn --compile-blocks inductor: the forwards and both 50-step
#                  runs with every block compiled (as TorchCompileModel gives users), static shapes, every
#                  new shape compiled in an untimed call                                         ~140 s (cap 240)
#   7. ours_gguf   bench_mmdit --attention cudnn --packed Q8_0: the forwards of step 1 with kept GGUF weights
#                  (never run on a GPU yet; runs after step 4, before 5 and 6)                   ~60 s (cap 120)
# Steps 5 and 6 were measured in the 2026-11-28 sessions (results/h200-2026-11-28b); they run when time is left.
# The second 2026-11-28 H200 run took 96 / 90 / 49 (comfy_memory, failed: no PyAV, since stubbed) / 140 s
# (compiled). The bf16-vs-float32 error of a whole forward (0.0147 with sdpa, 2026-11-28) is no longer a step: the
# device returns at most 8 files; benchmarks/bench_mmdit.py gives it by default. STDiT3 (bench_stdit3.py, measured
# in two H200 sessions) is not a step either.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
DIR=${OUT:-artifacts/gpu_session}
BUDGET=
while (($#)); do
    case $1 in
        --dry-run) DRY=1 ;;
        --out) DIR=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        *) echo "usage: $0 [--dry-run] [--out DIR] [--budget SECONDS]" >&2; exit 2 ;;
    esac
    shift
done
BUDGET=${BUDGET:-$((DRY ? 110 : 540))}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
exec > >(tee -a "$DIR/session.log") 2>&1
TEE=$!
STEPS=$(mktemp)
START=$(date +%s)
DEADLINE=$((START + BUDGET))
export PYTHONUNBUFFERED=1
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi

if ((DRY)); then
    MODE=dry-run
    COMMON=(--tiny --device cpu --repeats 1 --warmup 1)
else
    MODE=full
    COMMON=(--repeats 3 --max-seconds 8 --warmup 1)
fi
echo "== gpu_session ($MODE) $(date -u +%FT%TZ), budget ${BUDGET}s, python $PY, out $DIR"
git log -1 --format='repo %h %s' 2>/dev/null || true
if ! ((DRY)); then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: n/a"
    # Carried wheels (liger_kernel for the official code, torchsde for ComfyUI): into /tmp/site, ahead on the path.
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    if compgen -G ".whl/*.whl" >/dev/null; then
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
            echo "wheels installed: $(cd .whl && echo *.whl)"
        else
            echo "WARNING: carried wheels did not install; the official code falls back to the Liger shim"
        fi
    else
        echo "WARNING: no .whl/ wheels; the official code falls back to the Liger shim (not the official kernels)"
    fi
    # Packages that travel unpacked and xz-compressed (fa3-fwd: scripts/fetch_official.sh --wheels), into the same place.
    for packed in .whl/*.tar.xz; do
        [[ -f $packed ]] || continue
        if "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$packed" /tmp/site; then
            echo "unpacked $packed"
        else
            echo "WARNING: $packed did not unpack"
        fi
    done
    # The ComfyUI host for bench_comfy_memory travels packed (scripts/fetch_official.sh --wheels).
    if [[ -z ${COMFYUI_DIR:-} && ! -d .cache/comfyui-0.3.75 && -f .whl/comfyui-host.tar.gz ]]; then
        mkdir -p /tmp/comfyui-host && tar xzf .whl/comfyui-host.tar.gz -C /tmp/comfyui-host &&
            export COMFYUI_DIR=/tmp/comfyui-host/comfyui-0.3.75 && echo "ComfyUI host unpacked to $COMFYUI_DIR"
    fi
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
"$PY" -c "from opensora_lib import attention; print('attention backends here:', ', '.join(attention.available_backends()), attention._import_errors)"

record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STEPS"; }
skip() { echo "== SKIP $1: $2"; record "$1" skipped - 0 "$2"; }

# step NAME CAP_SECONDS COMMAND...: run under timeout (the cap or what is left of the budget, if less).
step() {
    local name=$1 cap=$2 left
    shift 2
    left=$((DEADLINE - $(date +%s)))
    if ((left < 15)); then skip "$name" "session budget spent"; return; fi
    ((cap > left)) && cap=$left
    echo "== STEP $name (limit ${cap}s): $*"
    local begin=$(date +%s) rc status
    timeout --kill-after=10 "$cap" "$@"
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    local took=$(($(date +%s) - begin))
    echo "== END $name: $status (exit $rc, ${took}s)"
    record "$name" "$status" "$rc" "$took" "limit ${cap}s"
}

official_json=()
official_ready() { [[ -s $DIR/official_mmdit.json ]] && official_json=(--official-json "$DIR/official_mmdit.json"); }

# 1. Ours with cuDNN attention: the forwards and both 50-step runs.
step ours_cudnn 200 "$PY" benchmarks/bench_mmdit.py "${COMMON[@]}" --attention cudnn --error-size none \
    --out "$DIR/mmdit_cudnn.json"

# 2. The official MMDiT and denoiser on the same random weights.
if [[ -f .official/opensora/models/mmdit/model.py ]]; then
    # Full size: only the official t2v sampler (its I2VDenoiser runs the same 3 passes per step for i2v; the
    # summary compares our i2v with it). The dry run keeps both for the float32 sampler agreement.
    if ((DRY)); then OFFICIAL_RUNS=(); else OFFICIAL_RUNS=(--cond-types t2v); fi
    step official 330 "$PY" benchmarks/official_mmdit.py "${COMMON[@]}" "${OFFICIAL_RUNS[@]}" --attention cudnn \
        --profile --out "$DIR/official_mmdit.json"
elif ((DRY)); then
    skip official ".official/ absent (bash scripts/fetch_official.sh); dry run goes on without it"
else
    echo "== official: .official/ is missing (carry it; bash scripts/fetch_official.sh makes it)"
    record official failed - 0 ".official/ missing"
fi

official_ready
# 3. Ours with FlashAttention-3: the attention kernels side by side, then the forwards and both 50-step runs. Dry
#    run: FA3 is not installed, so sdpa runs (the code path; the JSON says so).
step ours_fa3 150 "$PY" benchmarks/bench_mmdit.py "${COMMON[@]}" --attention flash_attn_3 --attention-kernels \
    --error-size none "${official_json[@]}" --out "$DIR/mmdit_fa3.json"

# 4. Ours with cuDNN attention and the torch forms instead of fused_ops' kernels (OPENSORA_FUSED_OPS=0): the
#    forwards only, what the fused forms save.
OPENSORA_FUSED_OPS=0 step ours_torch_forms 90 "$PY" benchmarks/bench_mmdit.py "${COMMON[@]}" --attention cudnn \
    --error-size none --steps 0 "${official_json[@]}" --out "$DIR/mmdit_cudnn_torch_forms.json"

# 7, run before 5 and 6 (those were measured on 2026-11-28). Ours with cuDNN attention and the Linear weights kept
#    as Q8_0 GGUF blocks (what Load Open-Sora DiT does with a GGUF file under weight_dtype default): the forwards
#    only, what expanding the blocks at each forward costs against step 1. Its JSON stays outside DIR (the device
#    tool returns 8 files); the table is in session.log.
step ours_gguf 120 "$PY" benchmarks/bench_mmdit.py "${COMMON[@]}" --attention cudnn --error-size none --steps 0 \
    --packed Q8_0 "${official_json[@]}" --out "${TMPDIR:-/tmp}/mmdit_gguf_q8_0.json"

# 5. ComfyUI partial loading within 24 GiB (another helper's script; called when present).
if [[ -f benchmarks/bench_comfy_memory.py ]]; then
    if ((DRY)); then
        step comfy_memory 60 "$PY" benchmarks/bench_comfy_memory.py --tiny --device cpu --out "$DIR/comfy_memory.json"
    else
        step comfy_memory 150 "$PY" benchmarks/bench_comfy_memory.py --out "$DIR/comfy_memory.json"
    fi
else
    skip comfy_memory "benchmarks/bench_comfy_memory.py not present"
fi

# 6. Ours with cuDNN attention and every block torch.compile'd (core's TorchCompileModel gives users the same):
#    the forwards and both 50-step runs. Dry run: the eager backend (the code path, no inductor build on a CPU).
if ((DRY)); then
    step ours_compiled 60 "$PY" benchmarks/bench_mmdit.py "${COMMON[@]}" --attention cudnn --error-size none \
        --compile-blocks eager "${official_json[@]}" --out "$DIR/mmdit_compiled.json"
else
    step ours_compiled 240 "$PY" benchmarks/bench_mmdit.py "${COMMON[@]}" --attention cudnn --error-size none \
        --compile-blocks inductor "${official_json[@]}" --out "$DIR/mmdit_compiled.json"
fi

"$PY" -m benchmarks.session_summary "$DIR" --steps "$STEPS" --mode "$MODE"
OK=$(awk -F'\t' '$2 == "ok"' "$STEPS" | wc -l)
RAN=$(awk -F'\t' '$2 != "skipped"' "$STEPS" | wc -l)
echo "== gpu_session done in $(($(date +%s) - START))s: $OK of $RAN steps run ok"
rm -f "$STEPS"
exec >&- 2>&-
wait "$TEE" 2>/dev/null  # session.log complete before the command returns
((OK > 0))  # exit status 1 when no step succeeded (the files still come back)
