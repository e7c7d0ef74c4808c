#!/bin/bash
# Call 2 of a GPU lease (the machine still warm from validate.sh, or fresh: it installs again):
# where the issue-13 steps spend their device time, and the variants no GPU has timed yet.
#   run(command="bash bench/gpu/profile.sh", timeout_s=590)
# - kernel profiles: the DM step (device RNG; fused norm_relu_pool and plain modules) and the DC step at ipc 50;
# - the CUDA tests of the fused paths and the chunked DM graph;
# - the dc_step / dm_step / norm_relu_pool bench cases with every CUDA variant.
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9]00' | tr 'H' 'h')
V=bench/results/validate-$(date +%F)-${GPU:-gpu}/profile; mkdir -p "$V"
cp "$0" "$V/"
(git rev-parse HEAD 2>/dev/null || echo "unknown: no git metadata in the device copy; see the session notes") > "$V/commit.txt"
if ! ls ddfast/_C_*.so > /dev/null 2>&1 || ! python3 -c "import ddfast" 2>/dev/null; then
  DDFAST_NO_EXTENSION=1 timeout 40 python3 -m pip install -q --no-deps --no-build-isolation -e . > "$V/install.log" 2>&1
  timeout 90 python3 setup.py build_ext --inplace > "$V/build.log" 2>&1
  echo "install+build rc=$? t=$(el)" | tee -a "$V/stages.log"
fi
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_norm_relu_pool.py tests/test_distribution_matcher.py \
  tests/test_cli.py -k "cuda" > "$V/tests.log" 2>&1
echo "tests rc=$? t=$(el)" | tee -a "$V/stages.log"
for spec in "dm_step/convnet3-cifar10-ipc50-device-rng ddfast" "dm_step/convnet3-cifar10-ipc50-device-rng modules" \
            "dc_step/convnet3-cifar10-ipc50 ddfast"; do
  set -- $spec; log="$V/profile-$(echo "$1" | tr '/' '_')-$2.log"
  timeout 60 python3 -m bench.profile_case "$1" "$2" --top 30 > "$log" 2>&1
  echo "profile $1 $2 rc=$? t=$(el)" | tee -a "$V/stages.log"
done
timeout 240 python3 -m ddfast.cli bench --no-progress --full --device cuda --repeats 5 --min-seconds 0.1 \
  -k '^(dc_step|dm_step|norm_relu_pool)/(?!.*cifar100)' --out "$V/bench.json" > "$V/bench.log" 2>&1
echo "bench rc=$? t=$(el)" | tee -a "$V/stages.log"
[ -n "$OUT" ] && tar czf "$OUT/profile.tar.gz" "$V"
tail -4 "$V/tests.log"; grep -v Warning "$V/bench.log" | tail -40
for f in "$V"/profile-*.log; do head -22 "$f"; done
