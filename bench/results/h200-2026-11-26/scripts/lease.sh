#!/bin/bash
# One GPU lease: build, CUDA tests || memcheck, bench (issue-13 cases first). Everything bounded.
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
L=/tmp/ddlogs; mkdir -p $L; CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
{ nvidia-smi; python3 -V; python3 -c "import torch,triton;print(torch.__version__,torch.version.cuda,triton.__version__)"; nproc; } >$L/env.log 2>&1
DDFAST_NO_EXTENSION=1 timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e . >$L/install.log 2>&1; echo "install rc=$? t=$(el)" | tee -a $L/stages.log
timeout 210 python3 setup.py build_ext --inplace -j 8 >$L/build.log 2>&1; echo "build rc=$? t=$(el)" | tee -a $L/stages.log
ls ddfast/*.so >>$L/build.log 2>&1
timeout 60 python3 -m ddfast.cli info --device cuda >$L/info.log 2>&1; echo "info rc=$? t=$(el)" | tee -a $L/stages.log
(timeout 220 python3 -m pytest tests -q -rs -p no:cacheprovider -k "cuda" -n 12 --junitxml=$L/tests.xml >$L/tests.log 2>&1; echo "tests rc=$? t=$(el)" | tee -a $L/stages.log) &
(PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 220 $CS --tool memcheck --error-exitcode 1 python3 -m pytest -q -p no:cacheprovider tests/test_gradient_match_fold.py tests/test_bn_stat.py tests/test_class_means.py tests/test_param_match.py -k "cuda and not slow and not graph" >$L/memcheck.log 2>&1; echo "memcheck rc=$? t=$(el)" | tee -a $L/stages.log) &
wait
LEFT=$(( 545 - $(el) )); echo "bench budget $LEFT" | tee -a $L/stages.log
timeout $LEFT python3 -m ddfast.cli bench --full --device cuda --no-progress --repeats 5 --min-seconds 0.1 -k '^(dc_step|dm_step|gradient_match|class_mean|param_match|dsa|bn_stat)/' --out $L/bench.json >$L/bench.log 2>&1; echo "bench rc=$? t=$(el)" | tee -a $L/stages.log
tar czf $OUT/logs.tar.gz -C /tmp ddlogs; cp $L/stages.log $L/bench.json $L/tests.log $L/memcheck.log $L/bench.log $OUT/ 2>/dev/null
tail -5 $L/tests.log; tail -5 $L/memcheck.log; grep -c "ERROR SUMMARY" $L/memcheck.log; tail -40 $L/bench.log
