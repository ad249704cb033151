#!/usr/bin/env bash
# The first accelerator figures from one call: speed.py --large, scale.py --max-size 1e8 and
# overhead.py, each limited in time so that the three finish in under 8 minutes on one GPU,
# their JSON, plots and printed tables (NAME.txt) written to one folder with devices.txt
# (what JAX sees) and summary.txt (each script's exit status and seconds).
#
#   bash benchmarks/device_check.sh [--quick] [OUT]   # OUT: default device_check-<date>/
#
# --quick runs each script with --quick (a CPU smoke test, seconds; tested in CI).
set -u -o pipefail

quick=0
out=""
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
    -*) echo "device_check.sh: unknown option $arg (use --quick, then an output folder)" >&2; exit 2 ;;
    *) out="$arg" ;;
  esac
done
here="$(cd "$(dirname "$0")" && pwd)"
out="${out:-device_check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
python="${PYTHON:-python}"

"$python" -c 'import jax; print(jax.__version__, jax.devices())' > "$out/devices.txt" 2>&1
command -v nvidia-smi > /dev/null && nvidia-smi >> "$out/devices.txt" 2>&1

# name, time limit in seconds (a hang must not eat the others' time), arguments
if [ "$quick" = 1 ]; then
  runs=("speed 600 --quick" "scale 600 --quick" "overhead 600 --quick")  # a loaded CI machine
else
  runs=("speed 200 --large --budget 10" "scale 150 --max-size 1e8" "overhead 120")
fi

status=0
: > "$out/summary.txt"
for run in "${runs[@]}"; do
  read -r name limit args <<< "$run"
  start=$SECONDS
  # shellcheck disable=SC2086  # the arguments are meant to split
  timeout "$limit" "$python" "$here/$name.py" $args --out "$out" > "$out/$name.txt" 2>&1
  code=$?
  line="$name.py $args: exit $code in $((SECONDS - start)) s"
  [ "$code" = 124 ] && line="$line (stopped at the $limit s limit)"
  echo "$line" | tee -a "$out/summary.txt"
  [ "$code" = 0 ] || status=1
done
echo "tables and JSON in $out/"
exit $status
