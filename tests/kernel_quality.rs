//! Kernel-quality gates readable without a GPU, over the fatbins build.rs made
//! (the portable module and the sm_90a one): zero spill bytes and zero stack
//! frame for every kernel on every SASS arch it is built for (ptxas's report
//! and cuobjdump -res-usage), HMMA (tensor-core) instructions in the sm_90a
//! SASS of every f16/bf16 forward, dA and fused backward kernel, TMA copies
//! (UTMALDG/UTMASTG) in the TMA forward's, and the sm_90a-only kernels
//! present in the sm_90a module alone (no stub another GPU could JIT).

use std::path::PathBuf;
use std::process::Command;

use singlora::kernel_names;

const FATBIN: &str = env!("SINGLORA_FATBIN_PATH");
const FATBIN_SM90: &str = env!("SINGLORA_FATBIN_SM90_PATH");
const REPORT: &str = env!("SINGLORA_PTXAS_REPORT_PATH");
const ARCHS: &str = env!("SINGLORA_BUILT_ARCHS");

fn sass_archs() -> Vec<String> {
    ARCHS
        .split(',')
        .map(str::trim)
        .filter(|a| a.starts_with("sm_"))
        .map(String::from)
        .collect()
}

/// cuobjdump: $SINGLORA_CUOBJDUMP, the one scripts/setup.sh installs, or PATH.
fn cuobjdump() -> PathBuf {
    if let Some(p) = std::env::var_os("SINGLORA_CUOBJDUMP") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(".toolchain/tools/nvidia/cu13/bin/cuobjdump");
    if local.is_file() {
        return local;
    }
    PathBuf::from("cuobjdump")
}

/// The sm_90a-only kernels (their own module).
fn is_sm90(name: &str) -> bool {
    name.contains("_sm90_")
}

/// The archs a kernel has SASS for: every SASS arch, or sm_90a alone.
fn archs_of(name: &str) -> Vec<String> {
    sass_archs()
        .into_iter()
        .filter(|a| !is_sm90(name) || a == "sm_90a")
        .collect()
}

fn run_cuobjdump(args: &[&str]) -> String {
    run_cuobjdump_on(FATBIN, args)
}

fn run_cuobjdump_on(fatbin: &str, args: &[&str]) -> String {
    let tool = cuobjdump();
    let out = Command::new(&tool)
        .args(args)
        .arg(fatbin)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "could not run {} ({e}); run `bash scripts/setup.sh`, which installs it",
                tool.display()
            )
        });
    assert!(
        out.status.success(),
        "cuobjdump {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// (kernel, arch) → (stack, spill stores, spill loads) from ptxas -v.
fn ptxas_properties() -> Vec<(String, String, [u64; 3])> {
    let report = std::fs::read_to_string(REPORT).expect("ptxas report");
    let mut rows = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let name = parts.next().unwrap().to_string();
            let arch = parts.nth(1).unwrap_or("").to_string();
            current = Some((name, arch));
        } else if line.contains("bytes stack frame") {
            let nums: Vec<u64> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            if let Some((name, arch)) = current.take() {
                rows.push((name, arch, [nums[0], nums[1], nums[2]]));
            }
        }
    }
    rows
}

#[test]
fn ptxas_reports_no_spills_and_no_stack_for_every_kernel() {
    let rows = ptxas_properties();
    for name in kernel_names() {
        for arch in archs_of(&name) {
            let row = rows
                .iter()
                .find(|(n, a, _)| *n == name && *a == arch)
                .unwrap_or_else(|| panic!("ptxas report has no entry for {name} on {arch}"));
            assert_eq!(
                row.2,
                [0, 0, 0],
                "{name} on {arch}: stack frame, spill stores, spill loads"
            );
        }
    }
}

#[test]
fn res_usage_shows_no_stack_and_no_local_memory() {
    for arch in sass_archs() {
        let mut usage = run_cuobjdump(&["-res-usage", "-arch", &arch]);
        if arch == "sm_90a" {
            usage += &run_cuobjdump_on(FATBIN_SM90, &["-res-usage", "-arch", &arch]);
        }
        let mut seen = 0;
        let mut lines = usage.lines();
        while let Some(line) = lines.next() {
            let Some(name) = line
                .trim()
                .strip_prefix("Function ")
                .map(|n| n.trim_end_matches(':'))
            else {
                continue;
            };
            let res = lines.next().unwrap_or("");
            assert!(
                res.contains("STACK:0 ") && res.contains("LOCAL:0 "),
                "{name} on {arch}: {res}"
            );
            seen += 1;
        }
        let expected = kernel_names()
            .iter()
            .filter(|n| archs_of(n).contains(&arch))
            .count();
        assert_eq!(seen, expected, "{arch}: kernels in -res-usage");
    }
}

#[test]
fn sass_of_half_precision_kernels_uses_tensor_cores() {
    if !sass_archs().iter().any(|a| a == "sm_90a") {
        println!("skipped: this build has no sm_90a SASS (SINGLORA_CUDA_ARCHS)");
        return;
    }
    let sass = run_cuobjdump(&["-sass", "-arch", "sm_90a"])
        + &run_cuobjdump_on(FATBIN_SM90, &["-sass", "-arch", "sm_90a"]);
    // Split the listing into functions.
    let mut functions: Vec<(String, String)> = Vec::new();
    for line in sass.lines() {
        if let Some(name) = line.trim().strip_prefix("Function : ") {
            functions.push((name.trim().to_string(), String::new()));
        } else if let Some((_, body)) = functions.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    let mut checked = 0;
    for name in kernel_names() {
        let half = name.contains("_f16_") || name.contains("_bf16_");
        if !half {
            continue;
        }
        let body = &functions
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name} not in SASS"))
            .1;
        let hmma = body
            .lines()
            .filter(|l| l.contains("HMMA.16816.F32"))
            .count();
        assert!(hmma > 0, "{name}: no HMMA in its sm_90a SASS");
        if name.starts_with("forward_tma_sm90_") {
            // Its tiles move by the bulk tensor engine, both ways.
            for op in ["UTMALDG.2D", "UTMASTG.2D"] {
                assert!(body.contains(op), "{name}: no {op} in its sm_90a SASS");
            }
        }
        checked += 1;
    }
    // f16/bf16 × (forward and dA in 4 rank buckets, decode and TMA forward
    // in 2 each, the small forward in 1 and the small dA in 2), and the
    // bf16 fused backward in 2.
    assert_eq!(
        checked,
        2 * (2 * 4 + 2 + 2 + 1 + 2) + 2,
        "f16/bf16 forward (portable, decode, TMA), dA and fused backward kernels, small configurations included"
    );
}

/// The decode kernels exist in the sm_90a module alone: the portable
/// module's PTX (which newer GPUs JIT) and its sm_80 SASS have none, so no
/// build, whatever its archs, can run a cluster-less stub of them; and the
/// sm_90a module carries SASS only (no PTX another GPU could JIT).
#[test]
fn sm90_kernels_live_in_the_sm90_module_only() {
    let portable_ptx = run_cuobjdump(&["-ptx"]);
    let portable_sass = run_cuobjdump(&["-sass"]);
    for name in kernel_names().iter().filter(|n| is_sm90(n)) {
        assert!(
            !portable_ptx.contains(name.as_str()),
            "{name} in the portable PTX"
        );
        assert!(
            !portable_sass.contains(name.as_str()),
            "{name} in the portable SASS"
        );
    }
    if sass_archs().iter().any(|a| a == "sm_90a") {
        let listing = run_cuobjdump_on(FATBIN_SM90, &["-lelf", "-lptx"]);
        assert!(listing.contains("sm_90a"), "sm_90a module: {listing}");
        assert!(
            !listing.contains("PTX file"),
            "sm_90a module carries PTX: {listing}"
        );
        let sass = run_cuobjdump_on(FATBIN_SM90, &["-sass"]);
        for name in kernel_names().iter().filter(|n| is_sm90(n)) {
            assert!(
                sass.contains(name.as_str()),
                "{name} missing from the sm_90a module"
            );
        }
    }
}

/// Every kernel's published launch shape (`name_info`: smem bytes, block
/// rows, block columns, rank capacity), read from the portable module's PTX
/// (the `.const` initialisers; trailing zero bytes are left out there).
fn published_info() -> Vec<(String, [u32; 4])> {
    let ptx = run_cuobjdump(&["-ptx"]);
    let mut out = Vec::new();
    for line in ptx.lines() {
        let Some(rest) = line.trim().strip_prefix(".const .align 4 .b8 ") else {
            continue;
        };
        let Some((name, init)) = rest.split_once("_info[16]") else {
            continue;
        };
        let mut bytes = [0u8; 16];
        if let Some((_, list)) = init.split_once('{') {
            for (i, b) in list.trim_end_matches(['}', ';']).split(',').enumerate() {
                bytes[i] = b.trim().parse().unwrap();
            }
        }
        let word = |i: usize| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
        out.push((name.to_string(), [word(0), word(1), word(2), word(3)]));
    }
    out
}

/// Devices that grant 99 KiB per block (sm_86, sm_89) run every rank: for
/// each element type and rank bucket, the regular forward and dA kernels fit
/// SINGLORA_SMALL_SMEM_BYTES or a small configuration exists that does, and a
/// small configuration exists only where the regular one does not fit.
#[test]
fn every_rank_has_a_configuration_that_fits_99_kib() {
    let limit = singlora::params::SINGLORA_SMALL_SMEM_BYTES;
    let info = published_info();
    let smem = |name: &str| info.iter().find(|(n, _)| n == name).map(|(_, i)| i[0]);
    let mut checked = 0;
    for t in ["f32", "f16", "bf16"] {
        for r in singlora::RANK_BUCKETS {
            for family in ["forward", "backward_da_partial"] {
                let regular = smem(&format!("{family}_{t}_r{r}"))
                    .unwrap_or_else(|| panic!("{family}_{t}_r{r}: no published info"));
                let small = smem(&format!("{family}_small_{t}_r{r}"));
                match small {
                    None => assert!(
                        regular <= limit,
                        "{family}_{t}_r{r} needs {regular} bytes > {limit} and has no small configuration"
                    ),
                    Some(s) => {
                        assert!(s <= limit, "{family}_small_{t}_r{r} needs {s} bytes > {limit}");
                        assert!(
                            regular > limit,
                            "{family}_small_{t}_r{r} exists although the regular one fits ({regular} bytes)"
                        );
                    }
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 3 * 4 * 2);
}
