//! Build script: nvcc compiles the kernels into the fatbins the library
//! embeds (every kernels/**/*.cu into the portable module; every `*_sm90.cu`
//! into the sm_90a module); bindgen turns kernels/params.h into the Rust
//! parameter structs; the kernel list (params.h's X-macros) becomes the
//! host's typed registry table; cc names the host C++ compiler that nvcc is
//! handed with -ccbin.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// SASS for sm_80 (also runs on sm_86 and sm_89) and sm_90a, plus PTX for
/// compute_80 so that newer GPUs can JIT the module.
const DEFAULT_ARCHS: &str = "sm_80,sm_90a,compute_80";

/// The pinned toolchain that scripts/setup.sh installs when no nvcc is found.
const LOCAL_NVCC: &str = ".toolchain/py/nvidia/cu13/bin/nvcc";
const LOCAL_LIBCLANG: &str = ".toolchain/py/clang/native";

const NO_NVCC_HELP: &str = "singlora: no CUDA compiler (nvcc) was found. The kernels in kernels/*.cu \
are compiled at build time, so one is needed. Looked at $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, \
and the project-local toolchain (.toolchain/). Run `bash scripts/setup.sh` from the crate root \
(it installs the pinned CUDA 13.0.88 compiler wheels with pip into .toolchain/, no root needed), \
or `bash scripts/test.sh`, which runs it and then the tests; or point NVCC at an nvcc of CUDA 12.8 or newer.";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernels = manifest.join("kernels");

    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=include/singlora.h");
    println!("cargo:rerun-if-changed=build.rs");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "SINGLORA_CUDA_ARCHS",
        "SINGLORA_NVCC_THREADS",
        "DOCS_RS",
        "LIBCLANG_PATH",
        "CXX",
        "HOST_CXX",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    generate_params(&manifest, &kernels, &out_dir);
    generate_kernel_list(&kernels, &out_dir);
    generate_abi_codes(&manifest, &out_dir);

    let fatbin = out_dir.join("singlora.fatbin");
    let fatbin_sm90 = out_dir.join("singlora_sm90.fatbin");
    let report = out_dir.join("ptxas-report.txt");
    let archs = env::var("SINGLORA_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    println!("cargo:rustc-env=SINGLORA_FATBIN_PATH={}", fatbin.display());
    println!(
        "cargo:rustc-env=SINGLORA_FATBIN_SM90_PATH={}",
        fatbin_sm90.display()
    );
    println!(
        "cargo:rustc-env=SINGLORA_PTXAS_REPORT_PATH={}",
        report.display()
    );
    println!("cargo:rustc-env=SINGLORA_BUILT_ARCHS={archs}");

    if env::var_os("DOCS_RS").is_some() {
        // docs.rs has no CUDA compiler: documentation needs no kernels.
        fs::write(&fatbin, b"").unwrap();
        fs::write(&fatbin_sm90, b"").unwrap();
        fs::write(&report, b"").unwrap();
        return;
    }

    let nvcc = find_nvcc(&manifest).unwrap_or_else(|| panic!("\n\n{NO_NVCC_HELP}\n\n"));
    let (portable, sm90): (Vec<PathBuf>, Vec<PathBuf>) = cu_sources(&kernels)
        .into_iter()
        .partition(|p| !is_sm90_source(p));
    // The sm_90a module is built only when sm_90a is among the archs: with
    // SINGLORA_CUDA_ARCHS=sm_80,compute_80 it is empty and the host never
    // offers its kernels.
    let sm90_flags = gencode_flags(archs.as_str())
        .into_iter()
        .filter(|f| f.ends_with("code=sm_90a"))
        .collect::<Vec<_>>();
    let build = Nvcc {
        nvcc: &nvcc,
        kernels: &kernels,
        out_dir: &out_dir,
    };
    let (main_report, sm90_report) = std::thread::scope(|scope| {
        let sm90_job = scope.spawn(|| {
            if sm90_flags.is_empty() {
                fs::write(&fatbin_sm90, b"").unwrap();
                return String::new();
            }
            build.compile("singlora_sm90", &sm90, &sm90_flags, &fatbin_sm90)
        });
        let main = build.compile("singlora", &portable, &gencode_flags(&archs), &fatbin);
        (main, sm90_job.join().expect("the sm_90a nvcc job panicked"))
    });
    // ptxas -v writes its resource report to stderr; the kernel-quality
    // tests read both modules' reports from this one file.
    fs::write(&report, format!("{main_report}{sm90_report}")).unwrap();
}

/// An sm_90a-only translation unit: kernels/<family>/*_sm90.cu.
fn is_sm90_source(path: &Path) -> bool {
    path.file_stem()
        .and_then(|s| s.to_str())
        .is_some_and(|s| s.ends_with("_sm90"))
}

/// Every .cu under kernels/, sorted (so the module's layout is stable).
fn cu_sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(cu_sources(&path));
        } else if path.extension().is_some_and(|e| e == "cu") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The C ABI's integer constants, from include/singlora.h (the one source):
/// every `#define SINGLORA_<NAME> <integer>` becomes a Rust constant with the
/// comment above it as its doc, and the status codes (`SINGLORA_OK`,
/// `SINGLORA_ERROR_*`) also a table of (code, name) for
/// `singlora_status_name`. Included by src/ffi/status.rs.
fn generate_abi_codes(manifest: &Path, out_dir: &Path) {
    let header = fs::read_to_string(manifest.join("include/singlora.h")).unwrap();
    let mut rs = String::from("// Generated by build.rs from include/singlora.h. Do not edit.\n");
    let mut statuses = Vec::new();
    let mut comment = String::new();
    for line in header.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("/*") {
            comment = rest.trim_end_matches("*/").trim().to_string();
            continue;
        }
        if t.starts_with('*') && !t.starts_with("*/") {
            comment.push(' ');
            comment.push_str(t.trim_start_matches('*').trim_end_matches("*/").trim());
            continue;
        }
        let mut parts = t.split_whitespace();
        if parts.next() != Some("#define") {
            comment.clear();
            continue;
        }
        let (Some(name), Some(value), None) = (parts.next(), parts.next(), parts.next()) else {
            comment.clear();
            continue;
        };
        if !name.starts_with("SINGLORA_") || value.parse::<i32>().is_err() {
            comment.clear();
            continue;
        }
        let doc = if comment.is_empty() {
            format!("`{name}` of include/singlora.h.")
        } else {
            comment.replace('`', "'")
        };
        rs += &format!("/// {doc}\npub const {name}: i32 = {value};\n");
        if name == "SINGLORA_OK" || name.starts_with("SINGLORA_ERROR_") {
            statuses.push(name.to_string());
        }
        comment.clear();
    }
    assert!(
        statuses.iter().any(|s| s == "SINGLORA_OK"),
        "include/singlora.h defines no SINGLORA_OK"
    );
    rs += &format!(
        "/// Every status code and its name, as include/singlora.h spells them.\n\
         pub const STATUS_NAMES: [(i32, &CStr); {}] = [\n",
        statuses.len()
    );
    for s in &statuses {
        rs += &format!("    ({s}, c\"{s}\"),\n");
    }
    rs += "];\n";
    fs::write(out_dir.join("abi_codes.rs"), rs).unwrap();
}

/// The entries of one X-macro list in params.h: the parenthesised argument
/// lists of the `X(...)` lines that follow `#define <name>(`.
fn xmacro_entries(header: &str, name: &str) -> Vec<Vec<String>> {
    let start = header
        .find(&format!("#define {name}("))
        .unwrap_or_else(|| panic!("kernels/params.h has no X-macro {name}"));
    let mut entries = Vec::new();
    for line in header[start..].lines().skip(1) {
        let line = line.trim().trim_end_matches('\\').trim();
        let Some(args) = line.strip_prefix("X(").and_then(|l| l.strip_suffix(')')) else {
            break;
        };
        entries.push(args.split(',').map(|a| a.trim().to_string()).collect());
    }
    assert!(!entries.is_empty(), "X-macro {name} lists nothing");
    entries
}

/// The kernel list of params.h as Rust: the element type names, the rank
/// buckets and the kernel families, in the header's order (included by
/// src/runtime/registry.rs).
fn generate_kernel_list(kernels: &Path, out_dir: &Path) {
    let header = fs::read_to_string(kernels.join("params.h")).unwrap();
    let dtypes: Vec<String> = xmacro_entries(&header, "SINGLORA_DTYPES")
        .into_iter()
        .map(|e| format!("{:?}", e[0]))
        .collect();
    let buckets = |name| -> Vec<String> {
        xmacro_entries(&header, name)
            .into_iter()
            .map(|e| e[2].clone())
            .collect()
    };
    let ranked = buckets("SINGLORA_RANK_BUCKETS");
    let families = xmacro_entries(&header, "SINGLORA_FAMILIES");
    let camel = |s: &str| -> String {
        s.split('_')
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect()
    };
    let mut rs =
        String::from("// Generated by build.rs from kernels/params.h's X-macros. Do not edit.\n");
    rs += &format!(
        "/// Element type names (`SINGLORA_DTYPES`), indexed by `singlora_dtype`.\n\
         pub const DTYPE_NAMES: [&str; {}] = [{}];\n",
        dtypes.len(),
        dtypes.join(", ")
    );
    rs += &format!(
        "/// Rank capacities of ranked families (`SINGLORA_RANK_BUCKETS`), smallest first.\n\
         pub const RANK_BUCKETS: [usize; {}] = [{}];\n",
        ranked.len(),
        ranked.join(", ")
    );
    rs += "/// The kernel families of `SINGLORA_FAMILIES`.\n\
           #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]\npub enum Family {\n";
    for f in &families {
        rs += &format!("    /// `{}`\n    {},\n", f[0], camel(&f[0]));
    }
    rs += "}\n";
    rs += &format!(
        "/// Every family with its naming and instantiation scheme, in the header's order.\n\
         pub const FAMILIES: [FamilySpec; {}] = [\n",
        families.len()
    );
    for f in &families {
        // The family's bucket list, named by the X-macro in the third column.
        let list = match f[2].as_str() {
            "NONE" => Vec::new(),
            name => buckets(name),
        };
        // Its element types, by the X-macro in the second column: their
        // codes (positions in SINGLORA_DTYPES).
        let types: Vec<String> = match f[1].as_str() {
            "NONE" => Vec::new(),
            name => xmacro_entries(&header, name)
                .into_iter()
                .map(|e| {
                    let code = dtypes
                        .iter()
                        .position(|d| *d == format!("{:?}", e[0]))
                        .unwrap_or_else(|| panic!("{name}: {} is not in SINGLORA_DTYPES", e[0]));
                    code.to_string()
                })
                .collect(),
        };
        rs += &format!(
            "    FamilySpec {{ family: Family::{}, name: {:?}, dtypes: &[{}], buckets: &[{}], sm90: {} }},\n",
            camel(&f[0]),
            f[0],
            types.join(", "),
            list.join(", "),
            f[0].ends_with("_sm90")
        );
    }
    rs += "];\n";
    fs::write(out_dir.join("kernel_list.rs"), rs).unwrap();
}

/// bindgen over kernels/params.h; the layout tests it emits run on CPU CI.
fn generate_params(manifest: &Path, kernels: &Path, out_dir: &Path) {
    let local = manifest.join(LOCAL_LIBCLANG);
    if env::var_os("LIBCLANG_PATH").is_none() && local.join("libclang.so").exists() {
        // clang-sys reads this when bindgen loads libclang at run time.
        env::set_var("LIBCLANG_PATH", &local);
    }
    let header = kernels.join("params.h");
    let bindings = bindgen::Builder::default()
        .header(header.to_str().unwrap())
        .allowlist_type("singlora_.*")
        .allowlist_var("SINGLORA_.*")
        .rustified_enum("singlora_dtype")
        .derive_default(true)
        .derive_debug(true)
        .derive_copy(true)
        .layout_tests(true)
        .generate()
        .unwrap_or_else(|e| {
            panic!(
                "\n\nsinglora: bindgen could not parse kernels/params.h ({e}). bindgen needs \
                 libclang: run `bash scripts/setup.sh` (installs it into .toolchain/) or set \
                 LIBCLANG_PATH to a folder holding libclang.so.\n\n"
            )
        });
    bindings.write_to_file(out_dir.join("params.rs")).unwrap();
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    let exe = |p: PathBuf| if p.is_file() { Some(p) } else { None };
    if let Some(p) = env::var_os("NVCC") {
        return exe(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            if let Some(p) = exe(PathBuf::from(root).join("bin/nvcc")) {
                return Some(p);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            if let Some(p) = exe(dir.join("nvcc")) {
                return Some(p);
            }
        }
    }
    exe(manifest.join(LOCAL_NVCC))
}

/// Each arch entry becomes one -gencode: `sm_XX` embeds SASS, `compute_XX` PTX.
fn gencode_flags(archs: &str) -> Vec<String> {
    let mut flags = Vec::new();
    for arch in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let (kind, num) = arch.split_once('_').unwrap_or_else(|| {
            panic!("SINGLORA_CUDA_ARCHS: `{arch}` is neither sm_XX nor compute_XX")
        });
        match kind {
            "sm" => flags.push(format!("-gencode=arch=compute_{num},code=sm_{num}")),
            "compute" => flags.push(format!("-gencode=arch=compute_{num},code=compute_{num}")),
            _ => panic!("SINGLORA_CUDA_ARCHS: `{arch}` is neither sm_XX nor compute_XX"),
        }
    }
    assert!(
        !flags.is_empty(),
        "SINGLORA_CUDA_ARCHS names no architecture"
    );
    flags
}

/// One nvcc invocation's fixed inputs.
struct Nvcc<'a> {
    nvcc: &'a Path,
    kernels: &'a Path,
    out_dir: &'a Path,
}

impl Nvcc<'_> {
    /// Compiles `sources` as one translation unit (so the fatbin is a single
    /// module; nvcc's --threads compiles the archs in parallel) for
    /// `gencode`, into `fatbin`; returns ptxas's resource report.
    fn compile(
        &self,
        unit: &str,
        sources: &[PathBuf],
        gencode: &[String],
        fatbin: &Path,
    ) -> String {
        let mut unity = format!("// generated by build.rs: the {unit} module's kernels/**/*.cu\n");
        for s in sources {
            unity.push_str(&format!("#include \"{}\"\n", s.display()));
        }
        let unity_path = self.out_dir.join(format!("{unit}_all.cu"));
        fs::write(&unity_path, unity).unwrap();

        let host_cxx = cc::Build::new()
            .cpp(true)
            .get_compiler()
            .path()
            .to_path_buf();
        let threads = env::var("SINGLORA_NVCC_THREADS").unwrap_or_else(|_| "0".into());

        let mut cmd = Command::new(self.nvcc);
        cmd.arg("-fatbin")
            .arg("-O3")
            .arg("-lineinfo")
            // Every test and bench binary embeds the fatbins, and the GPU
            // bundle carrying them must stay under 60 MiB.
            .arg("--compress-mode=size")
            .arg("-std=c++17")
            .arg("--threads")
            .arg(&threads)
            .arg("-Xptxas=-v")
            .arg("-ccbin")
            .arg(&host_cxx)
            .arg("-I")
            .arg(self.kernels)
            .args(gencode)
            .arg("-o")
            .arg(fatbin)
            .arg(&unity_path);
        let output = cmd.output().unwrap_or_else(|e| {
            panic!(
                "\n\nsinglora: could not run {}: {e}\n\n{NO_NVCC_HELP}\n\n",
                self.nvcc.display()
            )
        });
        if !output.status.success() {
            panic!(
                "\n\nsinglora: nvcc failed on the {unit} module ({}):\n{}\n{}\n",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        String::from_utf8_lossy(&output.stderr).into_owned()
    }
}
