#!/bin/bash
# Call 1 of a GPU lease: install, build, `ddfast validate` sized to one 10-minute command.
#   run(command="bash bench/gpu/validate.sh", timeout_s=590)
# Output: bench/results/validate-<date>-<gpu>/ (also tarred to $OUT). Commit it with the device name.
source bench/gpu/setup.sh
timeout 480 python3 -m ddfast.cli validate --out "$V" --budget-min 7.8 > "$V/validate.log" 2>&1
echo "validate rc=$? t=$(el)" | tee -a "$V/stages.log"
[ -n "$OUT" ] && tar czf "$OUT/validate.tar.gz" "$V" && cp "$V/SUMMARY.md" "$V/stages.log" "$OUT/" 2>/dev/null
head -80 "$V/SUMMARY.md"
