# Sourced by validate.sh and lease.sh: timer, environment, the results folder $V (with the device
# name, the commit and the calling script), then install and build, each logged in $V/stages.log.
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9]00' | tr 'H' 'h')
V=bench/results/validate-$(date +%F)-${GPU:-gpu}; mkdir -p "$V/scripts"
cp "$0" bench/gpu/setup.sh "$V/scripts/"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$V/nvidia-smi.csv" 2>&1
(git rev-parse HEAD 2>/dev/null || echo "unknown: no git metadata in the device copy; see the session notes") > "$V/commit.txt"
DDFAST_NO_EXTENSION=1 timeout 40 python3 -m pip install -q --no-deps --no-build-isolation -e . > "$V/install.log" 2>&1
echo "install rc=$? t=$(el)" | tee -a "$V/stages.log"
timeout 90 python3 setup.py build_ext --inplace > "$V/build.log" 2>&1
echo "build rc=$? t=$(el) so=$(ls ddfast/_C_*.so 2>/dev/null | wc -l)" | tee -a "$V/stages.log"
