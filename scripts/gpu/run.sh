#!/usr/bin/env bash
# scripts/gpu/run.sh — copied by scripts/bundle.sh to target/gpu-bundle/run.sh
# and run ON the GPU host (no Rust toolchain, no network) from the bundle:
#     bash target/gpu-bundle/run.sh
# Unpacks bin.tar.xz (bundle.sh packs bin/), then runs, in this order, with
# time limits so the whole run stays within RUN_BUDGET_S (default 520 s):
#   a. nvidia-smi                                        -> nvidia-smi.txt
#   b. every bin/test-* with SINGLORA_REQUIRE_GPU=1      -> tests.log
#      (a skipped GPU test is a failure here), then every bin/example-*
#      (quickstart; finetune, the main job, at d = 4096 bf16)
#   c. the PyTorch binding's python/check.py against lib/libsinglora.so
#      (vs PyTorch autograd in float64)                  -> tests.log
#   d. bin/bench-forward, bench-backward, bench-merge and bench-step (criterion, short), then
#      python/bench.py (our binding vs eager, torch.compile and the
#      materialised ΔW)                                  -> bench.log, bench-table.md
#      python/tests/test_peft_cpu.py on CUDA (our layers vs peft-singlora,
#      from the bundle's wheel) and python/examples/finetune_lm.py (its table
#      -> bench-table.md, finetune_lm.png/.json)         -> tests.log
#   e. with SINGLORA_NCU=1: Nsight Compute over the profile_* workloads -> ncu.txt
#   f. compute-sanitizer memcheck, racecheck, initcheck and synccheck over
#      the `sanitizer_*` tests of every bin/test-* that has some (found with
#      --list: the grid of every kernel × dtype × rank bucket × path in
#      bin/test-hardening first, then forward, backward, merge, mse, adamw;
#      and all of bin/test-small_smem, the 99 KiB configurations),
#      each tool's own error count parsed into the summary, within
#      SANITIZER_TOTAL_S and what is left of the budget  -> sanitizer.log
# and prints a summary LAST (also -> summary.txt). All files go flat into $OUT
# (default ./gpu-results, relative to where it is started). Every step runs even
# when an earlier one failed; the exit status is non-zero if anything failed.
set -uo pipefail # no -e: a failing step must not stop the others

OUT="${OUT:-gpu-results}"
mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")" || exit 1
BUNDLE="$(pwd)"
# scripts/bundle.sh ships bin/ packed as bin.tar.xz: unpack it first, in
# place, or in a copy of the bundle when its folder is read-only.
copy=""
if [[ ! -d bin && -f bin.tar.xz ]]; then
    if [[ ! -w . ]]; then
        copy="$(mktemp -d)"
        cp -r . "$copy"/ && cd "$copy" && BUNDLE="$(pwd)"
    fi
    tar -xJf bin.tar.xz 2>/dev/null ||
        python3 -c 'import sys, tarfile
t = tarfile.open(sys.argv[1])
t.extractall(".", filter="data") if hasattr(tarfile, "data_filter") else t.extractall(".")' bin.tar.xz ||
        echo "run.sh: could not unpack bin.tar.xz: no test or bench binaries" >&2
fi

TESTS_TOTAL_S=200
# The whole run, sanitizers last; the device call gets a little more.
RUN_BUDGET_S=${RUN_BUDGET_S:-520}
# Per (tool, binary) run, and all sanitizer runs together (the whole run
# should stay under 5 minutes).
SANITIZER_S=60
SANITIZER_TOTAL_S=${SANITIZER_TOTAL_S:-150}
SANITIZER_TOOLS="memcheck racecheck initcheck synccheck"
# Binaries run whole under the sanitizers (no sanitizer_ filter):
# small_smem launches the 99 KiB configurations, which need its process.
SANITIZER_WHOLE="test-small_smem"
BENCH_S=100
PY_CHECK_S=90
PY_BENCH_S=150
PY_PEFT_S=60
PY_EXAMPLE_S=120

for f in nvidia-smi.txt tests.log sanitizer.log bench.log bench-table.md summary.txt ncu.txt; do
    rm -f "$OUT/$f"
done
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch" ${copy:+"$copy"}' EXIT
started=$SECONDS

summary=()   # "label|status"
failed=0
record() {   # <label> <PASS|FAIL...>
    summary+=("$1|$2")
    [[ "$2" == PASS* ]] || failed=1
    printf '  %-40s %s\n' "$1" "$2"
}
status_of() { # <exit code> <log of the run> [need-tests]
    local rc="$1" log="$2" need="${3:-}"
    if ((rc == 124 || rc == 137)); then
        echo "FAIL (timeout)"
    elif ((rc != 0)); then
        echo "FAIL (exit $rc)"
    elif [[ -n "$need" ]] && grep -q 'running 0 tests' "$log" && ! grep -qE 'running [1-9][0-9]* tests?' "$log"; then
        echo "FAIL (no tests ran)"
    elif grep -q 'skipped: no CUDA device' "$log"; then
        echo "FAIL (skipped: no CUDA device)"
    else
        echo "PASS"
    fi
}
# py_run <log name> <dest> <heading> <limit s> <command...>: runs a Python
# step against the bundle's library within the limit, its output into
# $scratch/<log name> (py_log) and, under the heading, appended to
# $OUT/<dest>; its exit code in py_rc.
py_run() {
    local heading="$3" limit="$4" dest="$2"
    py_log="$scratch/$1"
    shift 4
    env SINGLORA_LIB="$BUNDLE/lib/libsinglora.so" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
        timeout --kill-after=10 "$limit" "$@" >"$py_log" 2>&1
    py_rc=$?
    { echo "### $heading (exit $py_rc)"; cat "$py_log"; echo; } >>"$OUT/$dest"
}

section() { echo; echo "=== $* ==="; }
important() { # <log> <ERE>: matching lines, plus each panic with its message line
    awk -v re="$2" '$0 ~ re { print; next } /panicked at/ { print; if ((getline l) > 0) print "    " l }' "$1"
}

# ------------------------------------------------------------ a. nvidia-smi
section "nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 60 nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
    rc=$?
    {
        echo
        echo "# nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap"
        timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
            --format=csv,noheader 2>&1
    } >>"$OUT/nvidia-smi.txt"
    sed -n '/^# nvidia-smi --query/,$p' "$OUT/nvidia-smi.txt" | tail -n +2 | sed 's/^/GPU: /'
    grep -m1 'Driver Version' "$OUT/nvidia-smi.txt"
    if ((rc == 0)); then record "nvidia-smi" PASS; else record "nvidia-smi" "FAIL (exit $rc)"; fi
else
    echo "nvidia-smi not found on PATH" | tee "$OUT/nvidia-smi.txt"
    record "nvidia-smi" "FAIL (not found)"
fi

# --------------------------------------------- libcublas for tests and benches
# cudarc opens libcublas at run time; on the host it may live in a pip wheel.
section "libcublas.so.13"
cublas_dir=""
if (ldconfig -p 2>/dev/null || true) | grep -q 'libcublas\.so\.13'; then
    echo "libcublas.so.13 is in the ldconfig cache"
else
    cublas_dir="$(timeout 30 python3 - 2>/dev/null <<'PY'
import glob, os
try:
    import nvidia.cublas as m
    d = os.path.join(os.path.dirname(m.__file__), "lib")
    if glob.glob(os.path.join(d, "libcublas.so.13*")):
        print(d); raise SystemExit
except ImportError:
    pass
try:
    import nvidia
    for root in nvidia.__path__:
        for hit in glob.glob(os.path.join(root, "**", "libcublas.so.13*"), recursive=True):
            print(os.path.dirname(hit)); raise SystemExit
except ImportError:
    pass
PY
    )"
    if [[ -z "$cublas_dir" ]]; then
        hit="$(timeout 60 find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o \
            -name 'libcublas.so.13*' -print 2>/dev/null | head -1)"
        [[ -n "$hit" ]] && cublas_dir="$(dirname "$hit")"
    fi
    if [[ -n "$cublas_dir" ]]; then
        export LD_LIBRARY_PATH="$cublas_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "libcublas.so.13 in $cublas_dir (prepended to LD_LIBRARY_PATH)"
    else
        echo "libcublas.so.13 not found (cuBLAS-based benches may fail)"
    fi
fi

# ------------------------------------------------------------------ b. tests
section "tests (SINGLORA_REQUIRE_GPU=1, --test-threads=4, ${TESTS_TOTAL_S}s in all)"
shopt -s nullglob
test_bins=(bin/test-*)
shopt -u nullglob
if ((${#test_bins[@]} == 0)); then
    echo "no bin/test-* in $BUNDLE" | tee -a "$OUT/tests.log"
    record "tests" "FAIL (no test binaries)"
fi
deadline=$((SECONDS + TESTS_TOTAL_S))
for bin in "${test_bins[@]}"; do
    name="$(basename "$bin")"
    left=$((deadline - SECONDS))
    if ((left <= 0)); then
        echo "### $name: not run, the ${TESTS_TOTAL_S}s test budget is spent" >>"$OUT/tests.log"
        record "$name" "FAIL (no time left)"
        continue
    fi
    log="$scratch/$name.log"
    SINGLORA_REQUIRE_GPU=1 timeout --kill-after=10 "$left" "$bin" --test-threads=4 >"$log" 2>&1
    rc=$?
    { echo "### $name (exit $rc)"; cat "$log"; echo; } >>"$OUT/tests.log"
    important "$log" '^test .* (FAILED|ignored)$|^test result:' | sed "s/^/[$name] /" | head -40
    record "$name" "$(status_of "$rc" "$log")"
done

# ---------------------------------------------------------------- examples
section "examples"
shopt -s nullglob
for bin in bin/example-*; do
    name="$(basename "$bin")"
    log="$scratch/$name.log"
    timeout --kill-after=10 60 "$bin" >"$log" 2>&1
    rc=$?
    { echo "### $name (exit $rc)"; cat "$log"; echo; } >>"$OUT/tests.log"
    sed "s/^/[$name] /" "$log" | head -20
    if ((rc == 0)) && ! grep -q '^no GPU' "$log"; then record "$name" PASS; else record "$name" "FAIL (exit $rc)"; fi
done
shopt -u nullglob

# ------------------------------------------- the PyTorch binding: check.py
section "PyTorch binding: python/check.py (${PY_CHECK_S}s)"
if [[ ! -f lib/libsinglora.so || ! -d python/singlora ]]; then
    echo "### python: lib/libsinglora.so or python/ is not in the bundle" >>"$OUT/tests.log"
    record "python check.py" "FAIL (not in the bundle)"
else
    py_run py-check.log tests.log python/check.py "$PY_CHECK_S" python3 python/check.py
    grep -E '^(FAIL|torch )|^check\.py:|FAILED:|Error|error' "$py_log" | sed "s/^/[check.py] /" | head -40
    record "python check.py" "$(status_of "$py_rc" "$py_log")"
fi

# -------------------------------------------------------------- d. benchmarks
section "benchmarks (${BENCH_S}s each)"
for name in bench-forward bench-backward bench-merge bench-step; do
    if [[ ! -x "bin/$name" ]]; then
        echo "### $name: not in the bundle" >>"$OUT/bench.log"
        record "$name" "FAIL (no bin/$name)"
        continue
    fi
    log="$scratch/$name.log"
    SINGLORA_REQUIRE_GPU=1 SINGLORA_BENCH_TABLE="$OUT/bench-table.md" \
        CRITERION_HOME="$scratch/criterion" \
        timeout --kill-after=10 "$BENCH_S" \
        "bin/$name" --bench --warm-up-time 0.5 --measurement-time 1 >"$log" 2>&1
    rc=$?
    { echo "### $name (exit $rc)"; cat "$log"; echo; } >>"$OUT/bench.log"
    grep -vE '^\s*$|^Benchmarking |Warming up|Collecting [0-9]+ samples|Analyzing|outliers among|\(.*%\) (low|high) (mild|severe)' "$log" |
        sed "s/^/[$name] /" | head -60
    record "$name" "$(status_of "$rc" "$log")"
done

# ------------------------------------------- the PyTorch binding: bench.py
section "PyTorch binding: python/bench.py (${PY_BENCH_S}s)"
if [[ ! -f lib/libsinglora.so || ! -d python/singlora ]]; then
    record "python bench.py" "FAIL (not in the bundle)"
else
    SINGLORA_BENCH_TABLE="$OUT/bench-table.md" \
        py_run py-bench.log bench.log python/bench.py "$PY_BENCH_S" python3 python/bench.py
    grep -vE '^\s*$' "$py_log" | sed "s/^/[bench.py] /" | tail -40
    record "python bench.py" "$(status_of "$py_rc" "$py_log")"
fi

# ----------------------- the PyTorch binding: singlora.peft and finetune_lm.py
# python/tests/test_peft_cpu.py with our layers on CUDA (inject; outputs and
# gradients equal to peft-singlora's; state dicts both ways), peft-singlora
# unpacked from the bundle's wheel (a pure-Python wheel is a zip), then
# python/examples/finetune_lm.py (singlora, peft-singlora, LoRA) whose table
# goes into bench-table.md and whose curves (finetune_lm.png/.json) into $OUT.
section "PyTorch binding: singlora.peft on CUDA (${PY_PEFT_S}s), finetune_lm.py (${PY_EXAMPLE_S}s)"
wheel="$(ls wheels/peft_singlora-*.whl 2>/dev/null | head -1)"
peft_dir="$scratch/peft-singlora"
if [[ ! -f lib/libsinglora.so || ! -d python/singlora ]]; then
    record "python test_peft (cuda)" "FAIL (not in the bundle)"
elif [[ -z "$wheel" ]]; then
    echo "### python peft: no wheels/peft_singlora-*.whl in the bundle" >>"$OUT/tests.log"
    record "python test_peft (cuda)" "FAIL (no peft-singlora wheel)"
elif ! python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    "$wheel" "$peft_dir" >>"$OUT/tests.log" 2>&1; then
    record "python test_peft (cuda)" "FAIL (could not unpack $wheel)"
else
    PYTHONPATH="$peft_dir${PYTHONPATH:+:$PYTHONPATH}" SINGLORA_PEFT_DEVICE=cuda \
        SINGLORA_REQUIRE_TORCH=1 SINGLORA_REQUIRE_PEFT=1 \
        py_run py-peft.log tests.log "python/tests/test_peft_cpu.py on CUDA" "$PY_PEFT_S" \
        python3 python/tests/test_peft_cpu.py
    grep -E '^(PASS|FAIL|skipped)|passed, [0-9]+ failed|ours vs' "$py_log" | sed "s/^/[test_peft] /" | head -40
    record "python test_peft (cuda)" "$(status_of "$py_rc" "$py_log")"
    PYTHONPATH="$peft_dir${PYTHONPATH:+:$PYTHONPATH}" \
        py_run py-example.log tests.log python/examples/finetune_lm.py "$PY_EXAMPLE_S" \
        python3 python/examples/finetune_lm.py --device cuda --hidden 512 --layers 4 --heads 8 \
        --seq 256 --batch 32 --pretrain-steps 300 --steps 200 --out "$OUT"
    grep -vE '^\s*$|^\[transformers\]|Warning|warnings\.warn' "$py_log" | sed "s/^/[finetune_lm] /" | tail -20
    if ((py_rc == 0)); then
        { echo; echo "### python/examples/finetune_lm.py (CUDA)"; grep -E '^\||^\(' "$py_log"; } >>"$OUT/bench-table.md"
    fi
    record "python finetune_lm.py (cuda)" "$(status_of "$py_rc" "$py_log")"
fi

# --------------------------------- the backward's DRAM bytes (issue 13)
# Nsight Compute's DRAM bytes per kernel of one bf16 backward at 16384 ×
# 4096, rank 16, saved S, dX at beta 0, by each path (the second backward of
# each workload; into bench-table.md), beside the byte model of benches/RESULTS.md: split 512 MiB
# (G twice, X, dX) + partials; fused 384 MiB (G, X, dX once) + Q (1 MiB) +
# partials (8 MiB written, then read by the reduction).
ncu_bin="$(command -v ncu 2>/dev/null || ls /usr/local/cuda/bin/ncu 2>/dev/null)"
if [[ -n "$ncu_bin" && -x bin/test-backward ]]; then
    section "backward DRAM bytes (ncu)"
    {
        echo "### backward DRAM bytes, rank 16, 16384 x 4096 bf16 (model: split 512 MiB + partials; fused 384 MiB + Q 1 MiB + partials 8 MiB written and 8 MiB read = 401 MiB)"
        for w in "profile_backward_bf16 3 3" "profile_backward_fused_bf16 2 2"; do
            read -r name skip count <<<"$w"
            echo "#### $name"
            timeout --kill-after=10 90 "$ncu_bin" --clock-control none --kernel-name "regex:forward|backward" \
                --launch-skip "$skip" --launch-count "$count" \
                --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
                bin/test-backward --ignored --exact "$name" 2>&1 |
                grep -E "forward_|backward_|dram__bytes|gpu__time_duration" || echo "(ncu failed for $name)"
        done
    } | tee -a "$OUT/bench-table.md"
fi

# ------------------------------------------------- optional: ncu profile
# SINGLORA_NCU=1: Nsight Compute over the `profile_*` workloads of
# bin/test-forward and bin/test-backward -> ncu.txt.
if [[ "${SINGLORA_NCU:-0}" == 1 ]]; then
    section "ncu (profile_* workloads)"
    ncu_bin="$(command -v ncu 2>/dev/null || ls /usr/local/cuda/bin/ncu 2>/dev/null)"
    if [[ -n "$ncu_bin" ]]; then
        ncu_args=(--clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis
            --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats)
        # Decode (16 tokens) and 16384 tokens: the third launch of each.
        timeout --kill-after=10 120 "$ncu_bin" "${ncu_args[@]}" --kernel-name regex:forward \
            --launch-skip 2 --launch-count 4 \
            bin/test-forward --ignored --exact profile_forward_bf16 >"$OUT/ncu.txt" 2>&1
        rc=$?
        # The second backward: its dX/Q launch, dA partials and reduction.
        timeout --kill-after=10 120 "$ncu_bin" "${ncu_args[@]}" --kernel-name "regex:forward|backward" --launch-skip 3 --launch-count 3 \
            bin/test-backward --ignored --exact profile_backward_bf16 >>"$OUT/ncu.txt" 2>&1
        rc=$((rc | $?))
        # Stall reasons of the 16384-token forward (the launch after the
        # decode one); a failure here only costs this detail.
        reasons=barrier,long_scoreboard,short_scoreboard,mio_throttle,lg_throttle,wait,math_pipe_throttle,not_selected,drain,dispatch_stall,no_instruction,membar,imc_miss,tex_throttle,branch_resolving,selected
        metrics="$(echo "$reasons" | tr ',' '\n' | sed 's/.*/smsp__average_warps_issue_stalled_&_per_issue_active.ratio/' | paste -sd,)"
        metrics="$metrics,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,smsp__inst_executed.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed"
        echo "### stall reasons" >>"$OUT/ncu.txt"
        timeout --kill-after=10 60 "$ncu_bin" --clock-control none --kernel-name regex:forward --launch-skip 3 --launch-count 1 \
            --metrics "$metrics" bin/test-forward --ignored --exact profile_forward_bf16 >>"$OUT/ncu.txt" 2>&1 ||
            echo "(stall metrics unavailable)" >>"$OUT/ncu.txt"
        sed -n '/### stall reasons/,$p' "$OUT/ncu.txt" | grep -E "stalled|bytes|inst_executed|throughput|forward_" | head -30
        grep -E "forward_|backward_|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Stall|Registers Per|Block Limit|Grid Size|Warp Cycles Per Issued" "$OUT/ncu.txt" | head -80
        record "ncu" "$(if ((rc == 0)); then echo PASS; else echo "FAIL (exit $rc)"; fi)"
    else
        record "ncu" "FAIL (not found)"
    fi
fi

# ------------------------------------------------------- f. compute-sanitizer
section "compute-sanitizer ($SANITIZER_TOOLS over the sanitizer_* tests, ${SANITIZER_S}s each, ${SANITIZER_TOTAL_S}s in all)"
sanitizer="$(command -v compute-sanitizer 2>/dev/null)"
if [[ -z "$sanitizer" ]]; then
    # shellcheck disable=SC2012 # cuda-X.Y folder names, sorted by version
    for c in /usr/local/cuda/bin/compute-sanitizer $(ls -d /usr/local/cuda-*/bin 2>/dev/null | sort -rV | sed 's|$|/compute-sanitizer|'); do
        if [[ -x "$c" ]]; then sanitizer="$c"; break; fi
    done
fi
[[ -n "$sanitizer" ]] && echo "compute-sanitizer: $sanitizer ($("$sanitizer" --version 2>/dev/null | tail -1))" | tee -a "$OUT/sanitizer.log"
# The binaries: the grid first, then those run whole, then every other one
# with sanitizer_* tests (a test path with a part starting `sanitizer_`: the
# filter below matches it), so a short budget cuts the oldest coverage.
san_bins=()
[[ -x bin/test-hardening ]] && san_bins+=(test-hardening)
for name in $SANITIZER_WHOLE; do
    [[ -x "bin/$name" ]] && san_bins+=("$name")
done
shopt -s nullglob
for bin in bin/test-*; do
    name="$(basename "$bin")"
    [[ " ${san_bins[*]:-} " == *" $name "* ]] && continue
    # (grep reads the whole list: an early exit could SIGPIPE the binary.)
    if "$bin" --list 2>/dev/null | grep -E '(^|::)sanitizer_[^ ]*: test$' >/dev/null; then
        san_bins+=("$name")
    fi
done
shopt -u nullglob
echo "binaries with sanitizer_* tests: ${san_bins[*]:-none} (run whole: $SANITIZER_WHOLE)" | tee -a "$OUT/sanitizer.log"
[[ " ${san_bins[*]:-} " == *" test-hardening "* ]] || record "sanitizer grid (bin/test-hardening)" "FAIL (not in the bundle or no sanitizer_* tests)"
san_errors() { # <log>: "<errors> <warnings>" as compute-sanitizer reported them, "? ?" if it did not
    local line e w
    # racecheck: "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)"
    line="$(grep -E 'RACECHECK SUMMARY: [0-9]+ hazards? displayed' "$1" | tail -1)"
    if [[ -n "$line" ]]; then
        e="$(grep -oE '[0-9]+ errors?' <<<"$line" | grep -oE '[0-9]+')"
        w="$(grep -oE '[0-9]+ warnings?' <<<"$line" | grep -oE '[0-9]+')"
        echo "${e:-?} ${w:-0}"
        return
    fi
    # memcheck, initcheck, synccheck: "ERROR SUMMARY: N errors"
    line="$(grep -E 'ERROR SUMMARY: [0-9]+ errors?' "$1" | tail -1)"
    if [[ -n "$line" ]]; then
        echo "$(grep -oE '[0-9]+ errors?' <<<"$line" | grep -oE '[0-9]+') 0"
        return
    fi
    echo "? ?"
}
# What is left of RUN_BUDGET_S, at most SANITIZER_TOTAL_S, goes to the
# sanitizers (a run that overruns its budget loses its summary to the
# caller's timeout). Tool by tool, so every tool sees the grid first.
san_deadline=$((started + RUN_BUDGET_S))
((san_deadline > SECONDS + SANITIZER_TOTAL_S)) && san_deadline=$((SECONDS + SANITIZER_TOTAL_S))
san_totals=()   # "tool errors warnings runs failed_runs"
for tool in $SANITIZER_TOOLS; do
    tool_errors=0 tool_warnings=0 tool_runs=0 tool_failed=0 tool_unknown=0
    for name in ${san_bins[@]+"${san_bins[@]}"}; do
        label="sanitizer $tool $name"
        left=$((san_deadline - SECONDS))
        if ((left < 10)); then
            echo "### $label: not run, the sanitizer budget is spent" >>"$OUT/sanitizer.log"
            record "$label" "FAIL (no time left)"
            tool_failed=$((tool_failed + 1))
            continue
        fi
        ((left > SANITIZER_S)) && left=$SANITIZER_S
        if [[ -z "$sanitizer" ]]; then
            echo "### $label: compute-sanitizer not found" >>"$OUT/sanitizer.log"
            record "$label" "FAIL (compute-sanitizer not found)"
            tool_failed=$((tool_failed + 1))
            continue
        fi
        log="$scratch/san.log"
        t0=$SECONDS
        filter=sanitizer_
        [[ " $SANITIZER_WHOLE " == *" $name "* ]] && filter=""
        SINGLORA_REQUIRE_GPU=1 timeout --kill-after=5 "$left" \
            "$sanitizer" --tool "$tool" --error-exitcode 1 "bin/$name" ${filter:+"$filter"} >"$log" 2>&1
        rc=$?
        { echo "### $label (exit $rc, $((SECONDS - t0)) s)"; cat "$log"; echo; } >>"$OUT/sanitizer.log"
        important "$log" 'ERROR SUMMARY|RACECHECK SUMMARY|^test result:|^========= [A-Z]' |
            sed "s/^/[$tool $name] /" | head -30
        read -r errs warns <<<"$(san_errors "$log")"
        tool_runs=$((tool_runs + 1))
        st="$(status_of "$rc" "$log" need-tests)"
        if [[ "$errs" == "?" ]]; then
            tool_unknown=$((tool_unknown + 1))
            [[ "$st" == PASS* ]] && st="FAIL (no sanitizer summary)"
            counts="no summary"
        else
            tool_errors=$((tool_errors + errs))
            tool_warnings=$((tool_warnings + warns))
            counts="$errs errors"
            [[ "$tool" == racecheck ]] && counts="$counts, $warns warnings"
            ((errs > 0)) && st="FAIL (sanitizer errors)"
        fi
        [[ "$st" == PASS* ]] || tool_failed=$((tool_failed + 1))
        record "$label" "${st} [$counts, $((SECONDS - t0)) s]"
    done
    unknown=""
    ((tool_unknown > 0)) && unknown=", $tool_unknown without a summary"
    if ((tool_failed == 0 && tool_runs > 0)); then t_status=PASS; else t_status=FAIL; fi
    record "sanitizer $tool (all binaries)" \
        "$t_status [$tool_errors errors, $tool_warnings warnings in $tool_runs runs$unknown]"
    san_totals+=("$tool=$tool_errors")
done
echo "sanitizer error counts: ${san_totals[*]}" | tee -a "$OUT/sanitizer.log"

# ----------------------------------------------------------------- e. summary
{
    echo
    echo "=================== SUMMARY ($((SECONDS - started)) s) ==================="
    for row in "${summary[@]}"; do
        printf '%-44s %s\n' "${row%%|*}" "${row#*|}"
    done
    echo "sanitizer errors: ${san_totals[*]:-none}"
    if ((failed)); then echo "RESULT: FAIL"; else echo "RESULT: PASS"; fi
    if [[ -s "$OUT/bench-table.md" ]]; then
        echo
        cat "$OUT/bench-table.md"
    fi
} | tee "$OUT/summary.txt"
exit "$failed"
