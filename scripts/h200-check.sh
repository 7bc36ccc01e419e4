#!/usr/bin/env bash
# The GPU checks the open issues wait for, for a CUDA machine without Rust (the lent H200): run from the
# repository root with an `nsa` built elsewhere — `cargo build --profile device -p nsa` (fat LTO, stripped:
# 79 MB, 15.8 MB xz-compressed, against 41 MB for the stripped release binary, so it and the working tree fit
# the 64 MiB a device call carries; ~17 min from cold), binary in $CARGO_TARGET_DIR/device/nsa.
#
#   scripts/h200-check.sh NSA OUT STAGE...      STAGE: golden | selftest[=KERNEL,...] | layer | autotune[=BUDGET] | serve[-fp8|-bf16|-real|-real-bf16] | bench=KERNEL[:VARIANT] | ncu=KERNEL:VARIANT[:DIM=SIZE,...] | sass=KERNEL:VARIANT[:DIM=SIZE,...] | order=KERNEL:VARIANT
#
# golden    the device model on CUDA against transformers' golden outputs (MHA and sparse-kernel prefill),
#           then a generation through the device cache (bench/golden_compare.py checks without numpy)
# selftest  every kernel variant against its f64 reference (selftest=K1,K2: only those kernels; the summary
#           line of each, and every failing check)
# layer     `nsa bench-layer` (prefill and decode) at DeepSeek-V3.2's shapes, PyTorch beside each step
# autotune  `nsa autotune` (resumes OUT/table.json; default budget 8m), then --show and --plot
# serve     `nsa serve --device cuda` (the tiny model) under bench/serve_load.py at concurrency 1, 16, 64
# serve-fp8 the same with `--kv-cache-dtype fp8_e4m3` (serve-bf16: `bf16`)
# serve-real two layers of DeepSeek-V3.2's real shapes (bench/real-shape: one dense, one MoE layer; random
#           weights, `--load-format dummy`; the tiny tokenizer widened to the 129280-token vocabulary), bf16
#           cache, under bench/serve_load.py at concurrency 1 (8 requests), then 16 and 64 (64 requests);
#           serve-real-bf16: the same with the routed experts in bf16 (`--dtype bfloat16`)
# bench=K[:V] `nsa bench K` (variant V, default every one; PyTorch beside; BATCH_MS=20 in the environment times
#           both near full clock instead of the sustained default), then ptxas on each generated wgmma kernel:
#           its registers and any C75xx serialization warning (products waiting on each other)
# ncu=K:V[:DIM=SIZE,...] Nsight Compute on the first launch of variant V in `nsa bench K` (sizes overridden by
#           each DIM=SIZE): time, tensor-pipe activity, instructions, issue rate and the stall reasons per issued
#           instruction
# sass=K:V[:DIM=SIZE,...] the same launch's warp-stall samples per SASS instruction (ncu source counters),
#           summarized by code region (block loop, per-tile code) by bench/sass_summary.py; the full table is
#           kept as OUT/sass-K-V.csv.xz
# order=K:V `nsa ir K --variant V` compiled by nvcc for sm_90a (near what NVRTC builds at run time): ptxas's
#           registers, spills and any C75xx serialization warning, and bench/sass_order.py's list of where
#           the waits, products, exponentials and stores landed in the SASS (OUT/order-K-V.txt; the SASS itself
#           as OUT/order-K-V.sass.xz).
#           Seconds, no GPU time: how the eighteenth session found a wgmma wait ptxas had hoisted
# The device tool brings back only a few files from its output folder: pass a scratch OUT and copy what
# matters (table.json, logs) into $OUT afterwards.
set -u
nsa=$1 out=$2
shift 2
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
mkdir -p "$out"
status=0
# `nsa serve --device cuda --port 30300 ARGS...` in the background (log: $out/$stage.log), waited for at
# most $1 half-seconds; stop_server ends it.
start_server() {
  local tries=$1
  shift
  "$nsa" serve --device cuda --port 30300 "$@" >"$out/$stage.log" 2>&1 &
  server=$!
  for _ in $(seq 1 "$tries"); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:30300/health')" 2>/dev/null && break; sleep 0.5; done
}
stop_server() {
  kill $server
  wait $server 2>/dev/null
}
for stage in "$@"; do
  echo "=== $stage ($(date +%T))"
  case $stage in
    golden)
      python3 bench/golden_compare.py ids "$out"
      for attention in mha sparse; do
        for n in 8 40 100; do
          "$nsa" forward --device cuda --attention "$attention" --input-ids "$out/ids$n.safetensors" \
            --out "$out/$attention$n.safetensors" 2>&1 | grep -E "prefill|error"
        done
        python3 bench/golden_compare.py check "$out/$attention%d.safetensors" || status=1
        rm -f "$out/$attention"*.safetensors  # the device tool returns few files; the check above has read them
      done
      "$nsa" generate --device cuda --prompt "<｜begin▁of▁sentence｜><｜User｜>Hello" --max-tokens 24 --ignore-eos || status=1
      ;;
    selftest) "$nsa" selftest --device cuda || status=1 ;;
    selftest=*)
      for kernel in $(echo "${stage#selftest=}" | tr ',' ' '); do
        "$nsa" selftest --device cuda --kernel "$kernel" >"$out/selftest-$kernel.log" 2>&1 || status=1
        echo "$kernel: $(grep -E 'passed' "$out/selftest-$kernel.log" | tail -1)"
        grep -E 'FAIL' "$out/selftest-$kernel.log"
      done
      ;;
    layer)
      table=()
      [ -f "$out/table.json" ] && table=(--table "$out/table.json")
      "$nsa" bench-layer --device cuda --torch bench/torch_reference.py "${table[@]}" || status=1
      "$nsa" bench-layer --device cuda --phase decode --torch bench/torch_reference.py "${table[@]}" || status=1
      ;;
    autotune*)
      budget=${stage#autotune=}
      [ "$budget" = autotune ] && budget=8m
      "$nsa" autotune --device cuda --budget "$budget" --out "$out/table.json" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -8
      "$nsa" autotune --show --out "$out/table.json" --plot "$out/table.svg" || status=1
      ;;
    serve | serve-fp8 | serve-bf16)
      flags=()
      [ "$stage" = serve-fp8 ] && flags=(--kv-cache-dtype fp8_e4m3)
      [ "$stage" = serve-bf16 ] && flags=(--kv-cache-dtype bf16)
      start_server 120 "${flags[@]}"
      python3 bench/serve_load.py http://127.0.0.1:30300 --concurrency 1,16,64 --requests 64 --max-tokens 16 || status=1
      stop_server
      ;;
    serve-real | serve-real-bf16)
      flags=()
      [ "$stage" = serve-real-bf16 ] && flags=(--dtype bfloat16)
      python3 bench/wide_tokenizer.py models/tiny-v32 "$out/wide-tokenizer" 129280
      start_server 600 --model-path bench/real-shape --load-format dummy --tokenizer-path "$out/wide-tokenizer" \
        --kv-cache-dtype bf16 "${flags[@]}"
      cat "$out/$stage.log"
      timeout 200 python3 bench/serve_load.py http://127.0.0.1:30300 --concurrency 1 --requests 8 --max-tokens 16 || status=1
      timeout 300 python3 bench/serve_load.py http://127.0.0.1:30300 --concurrency 16,64 --requests 64 --max-tokens 16 || status=1
      stop_server
      rm -rf "$out/wide-tokenizer"
      ;;
    bench=*)
      kernel=${stage#bench=}
      variant=all
      case $kernel in *:*) variant=${kernel#*:} kernel=${kernel%%:*} ;; esac
      rm -rf "$out/ptx" && mkdir -p "$out/ptx"
      CUBECL_CUDA_DUMP_PTX="$out/ptx" "$nsa" bench "$kernel" --variant "$variant" --device cuda --batch-ms "${BATCH_MS:-200}" \
        --torch bench/torch_reference.py || status=1
      for ptx in $(grep -l "wgmma.mma_async" "$out"/ptx/* 2>/dev/null); do
        echo "ptxas $(basename "$ptx" | cut -c1-60):"
        ptxas -arch=sm_90a -v "$ptx" -o /dev/null 2>&1 | grep -E "registers|C75[0-9][0-9]|spill" | sed 's/^/  /'
      done
      rm -rf "$out/ptx"
      ;;
    order=*)
      spec=${stage#order=}
      kernel=${spec%%:*} variant=${spec#*:}
      src="$out/order-$kernel-$variant"
      # NVRTC declares the fixed-width integer types itself; nvcc takes them from <cstdint>.
      { echo "#include <cstdint>"; echo "#include <cstddef>"
        "$nsa" ir "$kernel" --variant "$variant" | sed -E '/^typedef (un)?signed .*int[0-9]*_t;$/d'; } >"$src.cu"
      nvcc -cubin -arch=sm_90a -O3 -Xptxas -v -o "$src.cubin" "$src.cu" 2>&1 | grep -E "registers|spill|error|C75[0-9][0-9]" || status=1
      cuobjdump -sass "$src.cubin" >"$src.sass" && python3 bench/sass_order.py "$src.sass" >"$src.txt" || status=1
      head -1 "$src.txt"
      rm -f "$src.cu" "$src.cubin" "$src.sass.xz" && xz -9 "$src.sass"
      ;;
    ncu=* | sass=*)
      spec=${stage#*=}
      kernel=${spec%%:*} rest=${spec#*:}
      variant=${rest%%:*} shape=()
      case $rest in *:*) IFS=, read -ra dims <<<"${rest#*:}" && for dim in "${dims[@]}"; do shape+=(--shape "$dim"); done ;; esac
      if [ "${stage%%=*}" = sass ]; then
        report="$out/sass-$kernel-$variant"
        timeout 300 ncu --clock-control none --launch-count 1 --kernel-name "regex:${kernel%%_*}" \
          --section SourceCounters -f -o "$report" \
          "$nsa" bench "$kernel" --variant "$variant" --device cuda "${shape[@]}" 2>&1 | grep -E "^$variant " || status=1
        ncu -i "$report.ncu-rep" --page source --csv --print-source sass >"$report.csv" &&
          python3 bench/sass_summary.py "$report.csv" || status=1
        rm -f "$report.ncu-rep" "$report.csv.xz" && xz -9 "$report.csv"
        continue
      fi
      # Kernel names are the #[cube] function's (sparse_mla_wgmma_kernel…): match the variant's family loosely.
      timeout 300 ncu --clock-control none --launch-count 1 --kernel-name "regex:${kernel%%_*}" \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,smsp__issue_active.avg.per_cycle_active,gpu__time_duration.sum,sm__cycles_elapsed.avg" \
        "$nsa" bench "$kernel" --variant "$variant" --device cuda "${shape[@]}" 2>&1 |
        grep -E "ratio|pct|sum|avg|$variant " | awk '$NF+0 >= 0.05 || $0 ~ /'"$variant"' /' || status=1
      ;;
    *) echo "unknown stage $stage (golden, selftest[=KERNEL,...], layer, autotune[=BUDGET], serve, serve-fp8, serve-bf16, serve-real[-bf16], bench=KERNEL, ncu=KERNEL:VARIANT, sass=KERNEL:VARIANT, order=KERNEL:VARIANT)" >&2; exit 2 ;;
  esac
done
exit $status
