#!/bin/bash
# 2026-11-26 session 3, call 3 (fresh machine): DM's auto real-side chunking at CIFAR-100, kernel
# GB/s of the bandwidth ops, and a kernel profile of the DC step.
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
V=bench/results/validate-2026-11-26c-h200/after; mkdir -p $V
DDFAST_NO_EXTENSION=1 timeout 30 python3 -m pip install -q --no-deps --no-build-isolation -e . > $V/install.log 2>&1; echo "install rc=$? t=$(el)" | tee -a $V/stages.log
timeout 60 python3 setup.py build_ext --inplace > $V/build.log 2>&1; echo "build rc=$? t=$(el)" | tee -a $V/stages.log
timeout 35 python3 -m pytest -q -p no:cacheprovider tests/test_cli.py -k "cuda_reports_peak" tests/test_distribution_matcher.py > $V/tests.log 2>&1; echo "tests rc=$? t=$(el)" | tee -a $V/stages.log
timeout 105 python3 -m ddfast.cli bench --no-progress --full --device cuda --repeats 5 --min-seconds 0.1 \
  -k '^(param_match|class_mean)/|^dm_step/convnet3-cifar100' --out $V/bench.json > $V/bench.log 2>&1; echo "bench rc=$? t=$(el)" | tee -a $V/stages.log
timeout 40 python3 -m bench.profile_case dc_step/convnet3-cifar10-ipc10 ddfast --top 30 > $V/profile-dc-step.log 2>&1; echo "profile rc=$? t=$(el)" | tee -a $V/stages.log
cp .gpu/lease7.sh $V/
tail -4 $V/tests.log; grep -v Warning $V/bench.log | tail -32; head -45 $V/profile-dc-step.log
tar czf $OUT/after.tar.gz $V
