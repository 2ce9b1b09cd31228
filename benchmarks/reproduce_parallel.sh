#!/usr/bin/env bash
# `lora-cl reproduce` for one part, its methods split over several worker processes sharing one
# cell cache (a GPU has room for many SmolLM2-135M runs at once; each cell is still one process's
# work, so the cells are the same as a serial run's).
#   bash benchmarks/reproduce_parallel.sh -w WORKERS -t SECONDS -p PART -c CACHE -l LOGDIR \
#        [-m m1,m2,...] [-- more reproduce arguments, e.g. --seeds 3]
# Workers still running after SECONDS are stopped; finished cells stay in the cache (a stopped
# cell is not marked complete and reruns next time). Reports go to LOGDIR/docs-<i>.
set -uo pipefail
workers=4 seconds=600 part=2 cache=benchmarks/reproduction/cells logdir=. methods=""
while getopts "w:t:p:c:l:m:" opt; do
  case $opt in
    w) workers=$OPTARG ;; t) seconds=$OPTARG ;; p) part=$OPTARG ;; c) cache=$OPTARG ;;
    l) logdir=$OPTARG ;; m) methods=$OPTARG ;; *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
py=${PYTHON:-python3}
if [ -z "$methods" ]; then
  methods=$($py -c "from lora_cl.reproduce.grid import PARTS; print(','.join(PARTS[$part].methods))") || exit 2
fi
IFS=, read -ra all <<< "$methods"
mkdir -p "$logdir"
pids=()
for ((i = 0; i < workers; i++)); do
  mine=()
  for ((j = i; j < ${#all[@]}; j += workers)); do mine+=("${all[j]}"); done
  [ ${#mine[@]} -eq 0 ] && continue
  list=$(IFS=,; echo "${mine[*]}")
  echo "worker $i: $list"
  timeout -s TERM "$seconds" $py -m lora_cl.cli reproduce --only "$part" --methods "$list" --cache "$cache" \
      --docs "$logdir/docs-$i" --no-progress "$@" > "$logdir/worker-$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
