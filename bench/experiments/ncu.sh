#!/bin/bash
# ncu sections and stall counters of the Triton kernel and the Gluon experiment (or the kernels named after OUTDIR,
# ncu_one.py's choices): bench/experiments/ncu.sh OUTDIR [triton gluon ws16] (PYTHONPATH must reach comfy_sage)
set -x
OUT=${1:-/tmp}
SECS="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section SchedulerStats --section Occupancy --section InstructionStats"
KERNELS=${@:2}
for k in ${KERNELS:-triton gluon}; do
  ncu --clock-control none --kernel-name regex:_attn --launch-skip 1 --launch-count 1 $SECS --metrics smsp__inst_executed_pipe_xu.sum,sm__pipe_shared_cycles_active.avg.pct_of_peak_sustained_active,smsp__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,smsp__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,smsp__pipe_xu_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_elapsed,sm__cycles_elapsed.avg,smsp__cycles_active.avg -o $OUT/$k -f python3 -m comfy_sage.bench.experiments.ncu_one $k > $OUT/ncu_$k.log 2>&1
  ncu -i $OUT/$k.ncu-rep --page details > $OUT/ncu_$k.txt 2>&1
  ncu -i $OUT/$k.ncu-rep --page raw 2>&1 | grep "issue_stalled.*per_issue_active" > $OUT/ncu_${k}_stalls.txt
done
