#!/bin/bash
# Second lease: parallel JIT build, remaining CUDA tests (-v, live names) || memcheck (other ops) || TF32 diag.
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
L=/tmp/ddlogs; mkdir -p $L; CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
DDFAST_NO_EXTENSION=1 timeout 60 python3 -m pip install -q --no-deps --no-build-isolation -e . >$L/install.log 2>&1; echo "install rc=$? t=$(el)" >>$L/stages.log
for op in bn_stat class_mean_loss class_means dsa gradient_match mmd param_match supcon_nce; do
  (timeout 100 python3 -c "from ddfast import _extension as e; print(e._jit_build('$op'))" >$L/build_$op.log 2>&1; echo "build $op rc=$? t=$(el)" >>$L/stages.log) &
done; wait
IGN="--ignore=tests/test_class_means.py --ignore=tests/test_param_match.py --ignore=tests/test_bn_stat.py"
(timeout 110 python3 -m pytest tests $IGN -v -rfE --tb=short --durations=15 -p no:cacheprovider -k "cuda and not (test_gradient_match_fold and not graph)" -n 12 >$L/tests.log 2>&1; echo "tests rc=$? t=$(el)" >>$L/stages.log) &
(PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 105 $CS --tool memcheck --error-exitcode 1 python3 -m pytest -q -p no:cacheprovider tests/test_class_mean_loss.py tests/test_dsa.py tests/test_gradient_match.py tests/test_mmd.py tests/test_supcon_nce.py -k "cuda and not slow and not graph" >$L/memcheck.log 2>&1; echo "memcheck rc=$? t=$(el)" >>$L/stages.log) &
(timeout 105 python3 .gpu/diag.py >$L/diag.log 2>&1; echo "diag rc=$? t=$(el)" >>$L/stages.log) &
wait
cat $L/build_*.log > $L/build.log; tar czf $OUT/logs.tar.gz -C /tmp ddlogs; cp $L/stages.log $L/tests.log $L/memcheck.log $L/diag.log $OUT/
cat $L/stages.log; cat $L/diag.log; grep -E "ERROR SUMMARY|passed|failed" $L/memcheck.log | tail -3; grep -E "FAILED|ERROR" $L/tests.log | sort -u | tail -40
