#!/bin/bash
# A lease with under 5 minutes left: install, build, the CUDA tests (cut at 115 s), then the four
# issue-13 rows still owed (reference-RNG DSA and DM step, gradient_match ResNet-18, SRe2L's BN step).
# Results go to $OUT after every stage, so a cut call still returns what it finished.
#   run(command="bash bench/gpu/short.sh", timeout_s=300)
source bench/gpu/setup.sh
save() { [ -n "$OUT" ] && cp -r "$V" "$OUT/" 2>/dev/null; }
save
timeout 115 python3 -m pytest -q tests -k cuda -n 12 -rfE --tb=short -p no:cacheprovider > "$V/tests.log" 2>&1
echo "tests rc=$? t=$(el)" | tee -a "$V/stages.log"; tail -3 "$V/tests.log"; save
timeout 100 python3 -m ddfast.cli bench --no-progress --device cuda --full --repeats 3 --min-seconds 0.05 \
  -k '^(dsa/cifar10-b2560$|dm_step/convnet3-cifar10-ipc50$|gradient_match/resnet18|bn_stat/resnet18)' \
  --out "$V/bench.json" > "$V/bench.log" 2>&1
echo "bench rc=$? t=$(el)" | tee -a "$V/stages.log"; save
grep -E "FAILED|ERROR" "$V/tests.log" | head -20; cat "$V/bench.log" | tail -30
