#!/bin/bash
# The whole GPU lease in one call (a lease is 15 minutes of device time, the machine's start included,
# so a second call may not fit): install, build, `ddfast validate` without racecheck, then the
# kernel profiles of the issue-13 steps (and of SRe2L's ResNet-18 step with fuse_batchnorm=True).
#   run(command="bash bench/gpu/lease.sh", timeout_s=560)
# Output: bench/results/validate-<date>-<gpu>/ (tarred to $OUT). Commit it with the device name.
# racecheck is skipped: since its 0-hazard run on an H200 (bench/results/validate-2026-11-26c-h200,
# commit c0391b1) only gradient_match's backward changed (batched loads), and it uses no shared
# memory; run validate.sh when a kernel with shared memory changes.
# Measured (H100, 2026-11-26, d37bfa9): install + build 51 s, validate 282 s with the tests cut at
# 100 s (now 160 s; the bench 160 s, was 140), profiles 4 x 14 s: 389 s; about 7.5-8 minutes with the
# longer tests and bench steps.
source bench/gpu/setup.sh
mkdir -p "$V/profile"
timeout 425 python3 -m ddfast.cli validate --out "$V" --budget-min 7 --skip racecheck > "$V/validate.log" 2>&1
echo "validate rc=$? t=$(el)" | tee -a "$V/stages.log"
for spec in "dm_step/convnet3-cifar10-ipc50-device-rng ddfast" "dm_step/convnet3-cifar10-ipc50-device-rng modules" \
            "dc_step/convnet3-cifar10-ipc10 ddfast" "dc_step/convnet3-cifar10-ipc50 ddfast" \
            "bn_stat/resnet18-224-b100 fused-bn"; do
  set -- $spec; log="$V/profile/$(echo "$1" | tr '/' '_')-$2.log"
  timeout 40 python3 -m bench.profile_case "$1" "$2" --top 30 > "$log" 2>&1
  echo "profile $1 $2 rc=$? t=$(el)" | tee -a "$V/stages.log"
done
[ -n "$OUT" ] && tar czf "$OUT/lease.tar.gz" "$V" && cp "$V/SUMMARY.md" "$V/stages.log" "$OUT/" 2>/dev/null
cat "$V/SUMMARY.md"
for f in "$V"/profile/*.log; do echo "== $f"; head -18 "$f"; done
