#!/bin/bash
# 2026-11-26 session 3, call 2 (warm machine): CIFAR-100 DC/DM step and large mmd cases (memory
# fix of the segmented matcher; mmd's BLAS switch), then racecheck on the two files that timed out.
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
V=bench/results/validate-2026-11-26c-h200/extra; mkdir -p $V
timeout 170 python3 -m ddfast.cli bench --no-progress --full --device cuda --repeats 5 --min-seconds 0.1 \
  -k '^(dc_step|dm_step)/.*cifar100|^mmd/.*8192' --out $V/bench-cifar100-mmd.json > $V/bench-cifar100-mmd.log 2>&1
echo "bench rc=$?" | tee $V/stages.log
for f in mmd supcon_nce; do
  ( timeout 230 /usr/local/cuda/bin/compute-sanitizer --tool racecheck --error-exitcode 1 python3 -m pytest -q -rs -p no:cacheprovider -x tests/test_$f.py -k '(cuda and compiled and not slow and not gradcheck) and compiled' > $V/racecheck-$f.log 2>&1; echo "racecheck $f rc=$?" >> $V/stages.log ) &
done
wait
cat $V/stages.log; tail -3 $V/racecheck-*.log; tail -40 $V/bench-cifar100-mmd.log
cp .gpu/lease6.sh $V/
tar czf $OUT/extra.tar.gz $V
