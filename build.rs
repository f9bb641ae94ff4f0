//! Build script: nvcc compiles every kernels/*.cu into one fatbin that the
//! library embeds; bindgen turns kernels/singlora.h into the Rust parameter
//! structs; cc names the host C++ compiler that nvcc is handed with -ccbin.

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

    let fatbin = out_dir.join("singlora.fatbin");
    let report = out_dir.join("ptxas-report.txt");
    let archs = env::var("SINGLORA_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    println!("cargo:rustc-env=SINGLORA_FATBIN_PATH={}", fatbin.display());
    println!(
        "cargo:rustc-env=SINGLORA_PTXAS_REPORT_PATH={}",
        report.display()
    );
    println!("cargo:rustc-env=SINGLORA_BUILT_ARCHS={archs}");

    if env::var_os("DOCS_RS").is_some() {
        // docs.rs has no CUDA compiler: documentation needs no kernels.
        fs::write(&fatbin, b"").unwrap();
        fs::write(&report, b"").unwrap();
        return;
    }

    let nvcc = find_nvcc(&manifest).unwrap_or_else(|| panic!("\n\n{NO_NVCC_HELP}\n\n"));
    compile_kernels(&nvcc, &kernels, &out_dir, &archs, &fatbin, &report);
}

/// bindgen over the shared header; the layout tests it emits run on CPU CI.
fn generate_params(manifest: &Path, kernels: &Path, out_dir: &Path) {
    let local = manifest.join(LOCAL_LIBCLANG);
    if env::var_os("LIBCLANG_PATH").is_none() && local.join("libclang.so").exists() {
        // clang-sys reads this when bindgen loads libclang at run time.
        env::set_var("LIBCLANG_PATH", &local);
    }
    let header = kernels.join("singlora.h");
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
                "\n\nsinglora: bindgen could not parse kernels/singlora.h ({e}). bindgen needs \
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

fn compile_kernels(
    nvcc: &Path,
    kernels: &Path,
    out_dir: &Path,
    archs: &str,
    fatbin: &Path,
    report: &Path,
) {
    // One translation unit that includes every kernels/*.cu, so the fatbin is
    // a single module; nvcc's --threads compiles the archs in parallel.
    let mut sources: Vec<PathBuf> = fs::read_dir(kernels)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    let mut unity = String::from("// generated by build.rs: every kernels/*.cu in one module\n");
    for s in &sources {
        unity.push_str(&format!("#include \"{}\"\n", s.display()));
    }
    let unity_path = out_dir.join("singlora_all.cu");
    fs::write(&unity_path, unity).unwrap();

    let host_cxx = cc::Build::new()
        .cpp(true)
        .get_compiler()
        .path()
        .to_path_buf();
    let threads = env::var("SINGLORA_NVCC_THREADS").unwrap_or_else(|_| "0".into());

    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin")
        .arg("-O3")
        .arg("-lineinfo")
        // Every test and bench binary embeds the fatbin, and the GPU bundle
        // carrying them must stay under 60 MiB.
        .arg("--compress-mode=size")
        .arg("-std=c++17")
        .arg("--threads")
        .arg(&threads)
        .arg("-Xptxas=-v")
        .arg("-ccbin")
        .arg(&host_cxx)
        .arg("-I")
        .arg(kernels)
        .args(gencode_flags(archs))
        .arg("-o")
        .arg(fatbin)
        .arg(&unity_path);
    let output = cmd.output().unwrap_or_else(|e| {
        panic!(
            "\n\nsinglora: could not run {}: {e}\n\n{NO_NVCC_HELP}\n\n",
            nvcc.display()
        )
    });
    // ptxas -v writes its resource report to stderr; the kernel-quality tests read it.
    fs::write(report, &output.stderr).unwrap();
    if !output.status.success() {
        panic!(
            "\n\nsinglora: nvcc failed ({}):\n{}\n{}\n",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
