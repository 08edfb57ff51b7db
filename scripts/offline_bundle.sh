#!/usr/bin/env bash
# Write into OUT what a bare CUDA node (PyTorch, transformers, peft and tokenizers installed, no network)
# needs to train with zhllama and to run scripts/gpu_check.sh, in under 30 MB:
#   OUT/*.whl            DeepSpeed built into a wheel from its source distribution (no ops compiled:
#                        zhllama's default path uses none), DeepSpeed's dependencies and zhllama's
#                        training dependencies that such a node lacks, and zhllama itself
#   OUT/requirements.txt deepspeed at the tested version and zhllama's training dependencies at their
#                        floors: pip keeps what the node has and takes the rest from OUT
#   OUT/tokenizers/      the GPU check's two reference tokenizers, when this machine has them
#                        (--llama-tokenizer, --zh-sp; default ../shared/data): copies of your own files
#                        for your own nodes (the LLaMA tokenizer is under Meta's licence). Without
#                        them the check builds stand-in tokenizers from the repository's text.
#   OUT/MANIFEST.json    python version, platform, files and sizes
# Run it with the project's virtualenv active, on any machine that reaches the package index:
#   bash scripts/offline_bundle.sh OUT [--python 3.12] [--platform manylinux_2_28_x86_64]
# --platform is the newest manylinux policy the node's glibc meets; wheels of that policy and every
# older one are taken (manylinux_2_28, the default, is what torch 2.13's own wheels need; a
# manylinux2014 node, glibc 2.17, cannot run torch 2.13 nor the tested sentencepiece).
# On the node (docs/cluster.md):
#   pip install --no-index --find-links OUT -r OUT/requirements.txt
#   pip install --no-index --find-links OUT --no-deps zhllama
# or let scripts/gpu_check.sh --bundle OUT install it into a folder of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
usage="usage: bash scripts/offline_bundle.sh OUT [--python X.Y] [--platform TAG] [--llama-tokenizer FILE] [--zh-sp FILE]"
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || { echo "$usage" >&2; exit 2; }
out=$1
shift
py=${PYTHON:-python}
pyver="" platform=manylinux_2_28_x86_64 llama_sp="" zh_sp=""
while [ $# -gt 0 ]; do
  case $1 in
    --python) pyver=${2:?$usage}; shift 2 ;;
    --platform) platform=${2:?$usage}; shift 2 ;;
    --llama-tokenizer) llama_sp=${2:?$usage}; shift 2 ;;
    --zh-sp) zh_sp=${2:?$usage}; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "offline_bundle.sh: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
done
pyver=${pyver:-$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}
[[ $pyver =~ ^3\.[0-9]+$ ]] || { echo "offline_bundle.sh: --python must be like 3.12, got '$pyver'" >&2; exit 2; }
shared=${ZHLLAMA_SHARED:-$repo/../shared}
llama_sp=${llama_sp:-$shared/data/llama/tokenizer.model}
zh_sp=${zh_sp:-$shared/data/anchors/chinese_llama_sp.model}
limit_mb=${BUNDLE_LIMIT_MB:-30}
# The manylinux tags a node of policy $platform accepts: manylinux_2_N down to manylinux_2_5, with the
# legacy names (manylinux2014 = 2_17, manylinux2010 = 2_12, manylinux1 = 2_5).
case $platform in
  manylinux2014_*) glibc=17 arch=${platform#manylinux2014_} ;;
  manylinux2010_*) glibc=12 arch=${platform#manylinux2010_} ;;
  manylinux1_*) glibc=5 arch=${platform#manylinux1_} ;;
  manylinux_2_*_*) rest=${platform#manylinux_2_}; glibc=${rest%%_*} arch=${rest#*_} ;;
  *) glibc="" arch="" ;;
esac
platforms=(--platform "$platform")
if [[ $glibc =~ ^[0-9]+$ ]]; then
  platforms=()
  for ((k = glibc; k >= 5; k--)); do platforms+=(--platform "manylinux_2_${k}_$arch"); done
  [ "$glibc" -lt 17 ] || platforms+=(--platform "manylinux2014_$arch")
  [ "$glibc" -lt 12 ] || platforms+=(--platform "manylinux2010_$arch")
  platforms+=(--platform "manylinux1_$arch")
fi

say() { echo "offline_bundle: $*" >&2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
stage=$tmp/out
mkdir -p "$stage/tokenizers"

# 1. What to bundle: the dependency closure of DeepSpeed and of zhllama's training path, minus the
#    closure of what the node has (torch, transformers, peft, tokenizers), at the versions installed
#    here (the tested ones), markers evaluated for the target Python; DeepSpeed's pydantic always
#    (transformers brings it only through typer in some releases). requirements.txt asks for
#    deepspeed at the tested version and the rest at pyproject.toml's floors, so pip keeps what the
#    node already has and takes only the missing wheels from OUT.
"$py" - "$pyver" "$repo/pyproject.toml" "$tmp/requirements.txt" >"$tmp/pins.txt" <<'PY'
import re, sys, tomllib
from importlib import metadata
from packaging.requirements import Requirement

NODE = ["torch", "transformers", "peft", "tokenizers"]
# What `zhllama train`, vocab merge/resize, data pack and plan import (zhllama is installed with
# --no-deps); serve, selfinstruct, ROUGE and TensorBoard logging need more (docs/cluster.md).
NEEDED = ["deepspeed", "sentencepiece", "protobuf", "safetensors", "pyyaml", "jinja2", "numpy", "psutil", "packaging"]
ALWAYS = ["pydantic"]
env = {"python_version": sys.argv[1], "python_full_version": sys.argv[1] + ".0", "extra": ""}

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def closure(names):
    seen, todo = {}, [norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"offline_bundle: {name} is not installed here; run with the project's virtualenv active")
        seen[name] = dist.version
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate(env):
                todo.append(norm(req.name))
    return seen

have = closure(NODE)
want = closure(NEEDED)
bundled = {n: v for n, v in want.items() if n not in have}
bundled.update(closure(ALWAYS))
bundled = {n: v for n, v in bundled.items() if n not in ("typing-extensions",)}  # torch's own dependency
for name, version in sorted(bundled.items()):
    print(f"{name}=={version}")
floors = {norm(r.name): str(r.specifier) for r in map(Requirement, tomllib.load(open(sys.argv[2], "rb"))["project"]["dependencies"])}
with open(sys.argv[3], "w") as f:
    for name in NEEDED:
        f.write(f"deepspeed=={want['deepspeed']}\n" if name == "deepspeed" else f"{name}{floors.get(name, '')}\n")
PY
# 2. DeepSpeed: its source distribution, built into a wheel here (no ops: DS_BUILD_OPS=0).
ds_pin=$(grep '^deepspeed==' "$tmp/pins.txt")
"$py" -m pip download --quiet --no-deps --no-binary :all: "$ds_pin" -d "$tmp/sdist"
DS_BUILD_OPS=0 "$py" -m pip wheel --quiet --no-deps --no-build-isolation "$tmp"/sdist/deepspeed-*.tar.gz -w "$stage" \
  >"$tmp/deepspeed_build.log" 2>&1 || { tail -20 "$tmp/deepspeed_build.log" >&2; say "building DeepSpeed failed"; exit 1; }

# 3. The other pins: wheels only, for the target Python and platform.
others=()
while read -r pin; do
  [ "${pin%%==*}" = deepspeed ] || others+=("$pin")
done <"$tmp/pins.txt"
if [ "${#others[@]}" -gt 0 ]; then
  if ! "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp "${platforms[@]}" -d "$stage" "${others[@]}" >"$tmp/download.log" 2>&1; then  # not empty here
    grep -v "^WARNING: Location" "$tmp/download.log" >&2
    say "no wheel of these pins for Python $pyver on $platform"
    exit 1
  fi
fi

# 4. zhllama itself.
"$py" -m pip wheel --quiet --no-deps --no-build-isolation "$repo" -w "$stage" >"$tmp/zhllama_build.log" 2>&1 \
  || { tail -20 "$tmp/zhllama_build.log" >&2; say "building the zhllama wheel failed"; exit 1; }
cp "$tmp/requirements.txt" "$stage/requirements.txt"

# 5. The reference tokenizers, when this machine has them.
for pair in "$llama_sp:llama_tokenizer.model" "$zh_sp:chinese_llama_sp.model"; do
  src=${pair%:*} dst=${pair##*:}
  if [ -f "$src" ]; then
    cp "$src" "$stage/tokenizers/$dst"
  else
    say "no $src: the GPU check will build a stand-in tokenizer from the repository's text"
  fi
done

# 6. The manifest, the size limit, then OUT in one move.
"$py" - "$stage" "$pyver" "$platform" <<'PY'
import json, sys
from pathlib import Path
stage, pyver, platform = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
files = {str(p.relative_to(stage)): p.stat().st_size for p in sorted(stage.rglob("*")) if p.is_file()}
manifest = {"python": pyver, "platform": platform, "requirements": (stage / "requirements.txt").read_text().split(),
            "wheels": sorted(f for f in files if f.endswith(".whl")),
            "tokenizers": sorted(f.split("/", 1)[1] for f in files if f.startswith("tokenizers/")),
            "files": files, "total_bytes": sum(files.values())}
(stage / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
PY
bytes=$(du -sb "$stage" | cut -f1)
if [ "$bytes" -gt $((limit_mb * 1000 * 1000)) ]; then
  say "the bundle is $((bytes / 1000000)) MB, over the ${limit_mb} MB limit"; exit 1
fi
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$stage" "$out"
say "wrote $out: $(find "$out" -name '*.whl' | wc -l) wheels, $(ls "$out/tokenizers" | wc -l) tokenizers, $(awk "BEGIN {printf \"%.1f\", $bytes / 1e6}") MB"
