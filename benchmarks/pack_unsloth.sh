#!/usr/bin/env bash
# Pack unsloth 2026.10.9 and everything the GPU image lacks for it (and for peftchat) into ONE .tgz
# that travels with the device tool's `carry` (64 MiB in all with the repo).
#
#   bash benchmarks/pack_unsloth.sh [OUT.tgz]          # default: ./.whl/unsloth_site.tgz
#
# On the GPU machine (carry [".whl"]), install it by unpacking into a site dir:
#   mkdir -p /tmp/site && tar xzf .whl/unsloth_site.tgz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
#
# Wheels are unpacked rather than installed (they are zip files of site-packages); what the image
# cannot use is dropped: unsloth's studio/ web app and bitsandbytes' CUDA libraries for versions
# other than the image's CUDA 13.0. Versions: unsloth caps transformers at 5.17 (the image's) and
# needs trl <= 1.15 and datasets < 5 (4.3.0 works).
set -euo pipefail
out=${1:-.whl/unsloth_site.tgz}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
pkgs=(unsloth==2026.10.9 unsloth_zoo==2026.10.9 "trl==1.15.0" datasets==4.3.0 "dill<0.4.1" "multiprocess<0.70.17"
      tyro docstring-parser shtab typeguard hf_transfer cut_cross_entropy torchao msgspec json5 structlog
      nest-asyncio pydantic pydantic-core annotated-types typing-inspection diffusers
      bitsandbytes==0.50.2 liger-kernel omegaconf==2.4.0)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d "$work/whl" "${pkgs[@]}"
mkdir -p "$work/site"
for w in "$work"/whl/*.whl; do python3 -m zipfile -e "$w" "$work/site"; done
rm -rf "$work/site/studio" "$work/site/unsloth/studio"
find "$work/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda130*.so' ! -name 'libbitsandbytes_cpu.so' -delete
find "$work/site" -name '__pycache__' -prune -exec rm -rf {} +
mkdir -p "$(dirname "$out")"
tar czf "$out" -C "$work/site" .
ls "$work/whl"
du -sh "$work/site" "$out"
