#!/usr/bin/env bash
# Round 15's synthetic-to-real cells (docs/sim2real_prereg.md) on one GPU machine, every seed side by side.
#   benchmarks/sim2real_gpu.sh SHARED_DATA RESULTS_DIR [WORK_DIR]
# A CUDA smoke run first (train + evaluate --tta on 300 maps: stops here if the GPU path is broken), then the
# synthetic maps per seed, then each lever's seeds as separate sim2real.py processes, then each lever's tables
# (plain and --tta). RESULTS_DIR gets summary.txt (every table) and logs.tgz (logs and metrics, no weights),
# refreshed every 30 s. S2R_N, S2R_N3, S2R_LOC, S2R_LOC3, S2R_EPOCHS shrink it for a dry run on a CPU.
set -uo pipefail
[ $# -ge 2 ] || { echo "usage: $0 SHARED_DATA RESULTS_DIR [WORK_DIR]" >&2; exit 2; }
SHARED=$(realpath "$1"); RES=$(realpath -m "$2"); WORK=$(realpath -m "${3:-/tmp/s2r}")
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$RES" "$WORK/logs"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CLI=("$PY" -m waferlab.cli)
N=${S2R_N:-20000}; N3=${S2R_N3:-60000}; LOC1=${S2R_LOC:-3800}; LOC3=${S2R_LOC3:-11400}
COMMON=(--runs "synthetic only" --eval-calib --resize failkeep --epochs "${S2R_EPOCHS:-6}" --shared "$SHARED"
        --synth-set "fractions=[0.85, 0.15, 0.0]")
t0=$SECONDS
stamp() { echo "[$((SECONDS - t0)) s] $*"; }

collect() {  # every table and the logs, whatever has finished
    local f; for f in "$WORK"/logs/table_*.log; do  # each table log from its ensemble summary to its table's end
        [ -f "$f" ] && { echo "== $(basename "$f")"; awk '/ensemble on the calibration part/{p=1} /^commands/{p=0} p' "$f"; }
    done > "$RES/summary.txt"
    (cd "$WORK" && find . \( -name '*.log' -o -name 'metrics.json' -o -name 'timing.json' \
        -o -name 'versions.json' -o -name 'config.yaml' \) -print0 | tar czf "$RES/logs.tgz" --null -T -)
}
trap collect EXIT
(while sleep 30; do collect; done) & COLLECTOR=$!
waitjobs() { local p; for p in $(jobs -p); do [ "$p" = "$COLLECTOR" ] || wait "$p"; done; }  # not the collector

stamp "smoke: CUDA train + evaluate --tta"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"${CLI[@]}" data synth --n 300 --out "$WORK/smoke/s.npz" --seed 0 > "$WORK/logs/smoke.log" 2>&1 &&
"${CLI[@]}" train --model cbam --data "$WORK/smoke/s.npz" --epochs 1 --image-size 48 --no-progress \
    --out "$WORK/smoke/run" --overwrite >> "$WORK/logs/smoke.log" 2>&1 &&
"${CLI[@]}" evaluate "$WORK/smoke/run" --data "$WORK/smoke/s.npz" --tta --no-progress \
    --out "$WORK/smoke/eval" >> "$WORK/logs/smoke.log" 2>&1
rc=$?; grep -E "training|accuracy" "$WORK/logs/smoke.log" | head -5; grep -h '"cuda"' "$WORK"/smoke/run/versions.json
if [ $rc -ne 0 ]; then tail -n 30 "$WORK/logs/smoke.log"; stamp "smoke failed"; exit 1; fi

stamp "synthetic maps"
synth() { [ -f "$WORK/synth/$1_s$2.npz" ] || "${CLI[@]}" data synth --n "$1" --seed "$2" \
    --out "$WORK/synth/$1_s$2.npz" > "$WORK/logs/synth_$1_s$2.log" 2>&1; }
for s in 0 1 2 3 4 5; do synth "$N" $s & done
for s in 0 1 2; do synth "$N3" $s & done
waitjobs

lever() {  # NAME N SEEDS... -- sim2real.py options: one process per seed, then the two tables
    local name=$1 n=$2; shift 2; local seeds=(); while [ "$1" != -- ]; do seeds+=("$1"); shift; done; shift
    for s in "${seeds[@]}"; do
        mkdir -p "$WORK/$name/seed$s"; ln -f "$WORK/synth/${n}_s$s.npz" "$WORK/$name/seed$s/synth.npz"
        "$PY" benchmarks/sim2real.py --n "$n" --seeds "$s" --out "$WORK/$name" "${COMMON[@]}" "$@" \
            > "$WORK/logs/${name}_s$s.log" 2>&1 &
    done
    wait
    stamp "$name: runs done"
    for t in "" --tta; do  # the tables from the finished runs, plain then with test-time augmentation
        "$PY" benchmarks/sim2real.py --n "$n" --seeds "${seeds[@]}" --out "$WORK/$name" "${COMMON[@]}" "$@" \
            $t > "$WORK/logs/table_${name}${t:+_tta}.log" 2>&1
    done
    stamp "$name: tables done"
}
stamp "levers"
LOC=(--synth-set "balance_targets={Loc: $LOC1}")
lever base "$N" 0 1 2 3 4 5 -- --model cbam --image-size 48 "${LOC[@]}" &
lever r34 "$N" 0 1 2 -- --model resnet34 --image-size 48 "${LOC[@]}" &
lever n60k "$N3" 0 1 2 -- --model cbam --image-size 48 --synth-set "balance_targets={Loc: $LOC3}" &
lever px64 "$N" 0 1 2 -- --model cbam --image-size 64 "${LOC[@]}" &
waitjobs
# the adopted recipe's seeds 0-2 alone (the cells the rule compares with, measured on this GPU)
mkdir -p "$WORK/base3"; for s in 0 1 2; do ln -sfn "$WORK/base/seed$s" "$WORK/base3/seed$s"; done
for t in "" --tta; do
    "$PY" benchmarks/sim2real.py --n "$N" --seeds 0 1 2 --out "$WORK/base3" "${COMMON[@]}" --model cbam \
        --image-size 48 "${LOC[@]}" $t > "$WORK/logs/table_base3${t:+_tta}.log" 2>&1 &
done
waitjobs
stamp "all done"
kill $COLLECTOR 2>/dev/null
for f in "$WORK"/logs/table_*.log; do
    echo "== $(basename "$f")"; grep -E "^\| \*\*macro-F1|^\| min class|^calibration part" "$f"
done
