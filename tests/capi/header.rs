//! include/singlora.h is the one source of the C ABI. This file parses it
//! (prototypes and `#define`d codes) and holds to it, by name and type:
//! the Rust exports (parsed from src/ffi/*.rs), the symbols the built
//! libsinglora.so exports, the status table `singlora_status_name` serves,
//! the element types' codes, and the Python binding's ctypes table and
//! constants (python/singlora/_lib.py). A C99 program then includes the
//! header, redeclares every prototype as the Rust side spells it (a
//! disagreement is a compile error), links the library and calls it.

use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use half::{bf16, f16};
use singlora::ffi::*;
use singlora::DType;

use crate::*;

/// One function of the ABI as C spells it: normalised type names
/// (`int32_t`, `const char *`, ...; the header's `singlora_status` typedef
/// resolved to `int32_t`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Proto {
    name: String,
    ret: String,
    args: Vec<String>,
}

impl Proto {
    fn to_c(&self) -> String {
        let args = if self.args.is_empty() {
            "void".to_string()
        } else {
            self.args
                .iter()
                .enumerate()
                .map(|(i, t)| format!("{t} arg{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!("{} {}({});", self.ret, self.name, args)
    }
}

/// `const  char*` → `const char *`; the status typedef → its type.
fn normalise(c: &str) -> String {
    let spaced = c.replace('*', " * ");
    let t = spaced.split_whitespace().collect::<Vec<_>>().join(" ");
    match t.as_str() {
        "singlora_status" => "int32_t".to_string(),
        _ => t,
    }
}

fn strip_c_comments(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("/*") {
        out.push_str(&rest[..at]);
        match rest[at..].find("*/") {
            Some(end) => rest = &rest[at + end + 2..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

/// Every `singlora_*(...)` prototype of the header, in order.
fn header_prototypes(header: &str) -> Vec<Proto> {
    let code = strip_c_comments(header);
    assert!(
        code.contains("typedef int32_t singlora_status;"),
        "the header's status typedef changed: update normalise()"
    );
    let mut out = Vec::new();
    for decl in code.split(';') {
        let decl = decl
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join(" ");
        let Some(open) = decl.find('(') else { continue };
        let Some(close) = decl.rfind(')') else {
            continue;
        };
        let before = decl[..open].trim();
        let Some(name_at) = before.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) else {
            continue;
        };
        let name = &before[name_at + 1..];
        if !name.starts_with("singlora_") {
            continue;
        }
        let ret = before[..=name_at]
            .trim()
            .trim_start_matches("extern \"C\" {")
            .trim();
        let args: Vec<String> = decl[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|a| *a != "void" && !a.is_empty())
            .map(|a| {
                // The type is everything before the parameter's name.
                let cut = a
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .expect("a named parameter");
                normalise(&a[..=cut])
            })
            .collect();
        out.push(Proto {
            name: name.to_string(),
            ret: normalise(ret),
            args,
        });
    }
    out
}

/// Every `#define SINGLORA_<NAME> <integer>` of the header.
fn header_defines(header: &str) -> Vec<(String, i64)> {
    header
        .lines()
        .filter_map(|l| {
            let mut p = l.split_whitespace();
            (p.next()? == "#define").then_some(())?;
            let (name, value) = (p.next()?, p.next()?);
            let value = value.parse().ok()?;
            (name.starts_with("SINGLORA_") && p.next().is_none()).then(|| (name.to_string(), value))
        })
        .collect()
}

/// One C type of the ABI as (src/ffi/*.rs, python/singlora/_lib.py,
/// C) spell it.
type Spelling = (&'static str, &'static str, &'static str);

const SPELLINGS: &[Spelling] = &[
    ("i32", "_i32", "int32_t"),
    ("i64", "_i64", "int64_t"),
    ("u64", "_u64", "uint64_t"),
    ("f32", "_f32", "float"),
    ("f64", "_f64", "double"),
    ("*const c_char", "_str", "const char *"),
    ("*mut c_void", "_ptr", "void *"),
    ("*mut u64", "ctypes.POINTER(_u64)", "uint64_t *"),
    ("*mut u8", "ctypes.POINTER(_u8)", "uint8_t *"),
];

/// The C spelling of `t` as `file` spells it (`pick` its column of
/// [`SPELLINGS`]).
fn to_c(file: &str, kind: &str, pick: fn(&Spelling) -> &'static str, t: &str) -> String {
    SPELLINGS
        .iter()
        .find(|s| pick(s) == t)
        .unwrap_or_else(|| panic!("{file}: no C spelling for the {kind} type `{t}`"))
        .2
        .to_string()
}

fn rust_to_c(t: &str) -> String {
    let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    to_c("src/ffi/*.rs", "Rust", |s| s.0, &t)
}

/// Every `extern "C" fn singlora_*` of src/ffi/*.rs.
fn rust_exports(src: &str) -> Vec<Proto> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(at) = rest.find("extern \"C\" fn singlora_") {
        let tail = &rest[at + "extern \"C\" fn ".len()..];
        let open = tail.find('(').unwrap();
        let close = tail.find(')').unwrap();
        let body = tail.find('{').unwrap();
        let name = tail[..open].trim().to_string();
        let args = tail[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| rust_to_c(a.split_once(':').expect("name: type").1))
            .collect();
        let ret = tail[close + 1..body].trim().trim_start_matches("->").trim();
        out.push(Proto {
            name,
            ret: rust_to_c(ret),
            args,
        });
        rest = &tail[body..];
    }
    out
}

fn ctypes_to_c(t: &str) -> String {
    to_c("python/singlora/_lib.py", "ctypes", |s| s.1, t.trim())
}

/// The `_SIGNATURES` table of python/singlora/_lib.py.
fn python_signatures(src: &str) -> Vec<Proto> {
    let start = src
        .find("_SIGNATURES = {")
        .expect("_lib.py has a _SIGNATURES table");
    let end = start
        + src[start..]
            .find("\n}")
            .expect("the table ends with a closing brace");
    let table: String = src[start..end]
        .lines()
        .map(|l| l.split('#').next().unwrap())
        .collect::<Vec<_>>()
        .join(" ");
    let mut out = Vec::new();
    for entry in table.split("\"singlora_").skip(1) {
        let (name, rest) = entry.split_once('"').unwrap();
        let rest = rest.trim_start().trim_start_matches(':').trim_start();
        let rest = rest.strip_prefix('(').expect("(restype, [argtypes])");
        let (ret, rest) = rest.split_once(',').unwrap();
        let open = rest.find('[').unwrap();
        let close = rest.find(']').unwrap();
        let args = rest[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(ctypes_to_c)
            .collect();
        out.push(Proto {
            name: format!("singlora_{name}"),
            ret: ctypes_to_c(ret),
            args,
        });
    }
    out
}

/// `NAME = <integer>` lines of _lib.py (module-level constants).
fn python_constants(src: &str) -> Vec<(String, i64)> {
    src.lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(" = ")?;
            let value = value.split('#').next()?.trim().parse().ok()?;
            name.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                .then(|| (name.to_string(), value))
        })
        .collect()
}

struct Sources {
    header: String,
    exports: String,
    python: String,
}

/// The three files, or `None` after printing the skip on the GPU host (the
/// bundle has no sources).
fn sources() -> Option<Sources> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(root.join(p)).ok();
    let out = || {
        Some(Sources {
            header: read("include/singlora.h")?,
            // Every module of src/ffi/ that exports functions.
            exports: ["exports", "forward", "backward", "merge"]
                .iter()
                .map(|m| read(&format!("src/ffi/{m}.rs")))
                .collect::<Option<Vec<_>>>()?
                .concat(),
            python: read("python/singlora/_lib.py")?,
        })
    };
    let out = out();
    if out.is_none() {
        println!("skipped: the sources are not on this machine (build machine only)");
    }
    out
}

/// Compares two ABI descriptions, naming every function that differs.
fn assert_same_abi(what: &str, mut got: Vec<Proto>, mut want: Vec<Proto>) {
    got.sort();
    want.sort();
    let names = |v: &[Proto]| v.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&got),
        names(&want),
        "{what}: the functions differ from the header's"
    );
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(
            g, w,
            "{what}: `{}` differs from the header's prototype",
            w.name
        );
    }
}

#[test]
fn rust_exports_match_the_header() {
    let Some(src) = sources() else { return };
    let header = header_prototypes(&src.header);
    assert!(header.len() >= 10, "parsed only {header:?}");
    assert_same_abi("src/ffi/*.rs", rust_exports(&src.exports), header);
}

#[test]
fn python_ctypes_table_matches_the_header() {
    let Some(src) = sources() else { return };
    let header = header_prototypes(&src.header);
    assert_same_abi(
        "python/singlora/_lib.py",
        python_signatures(&src.python),
        header,
    );
}

#[test]
fn codes_match_the_header_in_rust_python_and_the_library() {
    let Some(src) = sources() else { return };
    let defines = header_defines(&src.header);
    let get = |name: &str| {
        defines
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("the header defines no {name}"))
            .1
    };
    // Status codes: the header's, the Rust table's, the library's names.
    let header_status: Vec<(String, i64)> = defines
        .iter()
        .filter(|(n, _)| n == "SINGLORA_OK" || n.starts_with("SINGLORA_ERROR_"))
        .cloned()
        .collect();
    let rust_status: Vec<(String, i64)> = STATUS_NAMES
        .iter()
        .map(|(c, n)| (n.to_str().unwrap().to_string(), *c as i64))
        .collect();
    assert_eq!(rust_status, header_status, "STATUS_NAMES vs the header");
    for (name, code) in &header_status {
        assert_eq!(
            &status_name(*code as i32),
            name,
            "singlora_status_name({code})"
        );
    }
    // SAFETY: a static NUL-terminated string.
    let unknown = unsafe { CStr::from_ptr(singlora_status_name(12345)) };
    assert_eq!(unknown.to_str().unwrap(), "SINGLORA_UNKNOWN_STATUS");
    // Element types: the header's codes are the kernels' (params.h's enum).
    assert_eq!(get("SINGLORA_DTYPE_F32"), f32::CODE as i64);
    assert_eq!(get("SINGLORA_DTYPE_F16"), f16::CODE as i64);
    assert_eq!(get("SINGLORA_DTYPE_BF16"), bf16::CODE as i64);
    assert_eq!(get("SINGLORA_ABI_VERSION"), singlora_abi_version() as i64);
    // Python: every code under the header's name without SINGLORA_, and no
    // code the header lacks.
    let py = python_constants(&src.python);
    let codes = |n: &str| {
        n == "OK"
            || n.starts_with("ERROR_")
            || n.starts_with("DTYPE_")
            || n.starts_with("BACKWARD_")
            || n == "ABI_VERSION"
    };
    let mut py_codes: Vec<(String, i64)> = py.into_iter().filter(|(n, _)| codes(n)).collect();
    let mut want: Vec<(String, i64)> = defines
        .iter()
        .map(|(n, v)| (n.trim_start_matches("SINGLORA_").to_string(), *v))
        .filter(|(n, _)| codes(n))
        .collect();
    py_codes.sort();
    want.sort();
    assert_eq!(
        py_codes, want,
        "python/singlora/_lib.py's constants vs the header"
    );
}

/// Where the libsinglora.so built with this test is: next to it in cargo's
/// `deps` folder (or one folder up), or in `lib/` beside `bin/` in the GPU
/// bundle. The second field is true in a cargo build folder, where a missing
/// library or C compiler is a failure rather than a skip.
fn cdylib_dir() -> (Option<PathBuf>, bool) {
    let Some(exe) = std::env::current_exe().ok() else {
        return (None, false);
    };
    let Some(dir) = exe.parent() else {
        return (None, false);
    };
    let in_cargo = dir.file_name().is_some_and(|n| n == "deps");
    let up = dir.parent().unwrap_or(dir);
    let found = [dir.to_path_buf(), up.to_path_buf(), up.join("lib")]
        .into_iter()
        .find(|d| d.join("libsinglora.so").is_file());
    (found, in_cargo)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

const C_MAIN: &str = r#"
#include <stdio.h>
#include <string.h>

static int failures = 0;
#define EXPECT(cond) do { if (!(cond)) { printf("FAILED: %s (line %d)\n", #cond, __LINE__); failures++; } } while (0)

int main(void) {
    uint64_t bytes = 0;
    singlora_status st;
    EXPECT(strcmp(singlora_version(), EXPECTED_VERSION) == 0);
    EXPECT(singlora_abi_version() == SINGLORA_ABI_VERSION);
    EXPECT(strcmp(singlora_last_error(), "") == 0);
    EXPECT(strcmp(singlora_status_name(SINGLORA_ERROR_NO_DRIVER), "SINGLORA_ERROR_NO_DRIVER") == 0);

    st = singlora_backward_workspace_size(16384, 4096, 4096, 64, 1, &bytes);
    EXPECT(st == SINGLORA_OK);
    EXPECT(bytes == EXPECTED_WS_BYTES);

    /* a null x with tokens > 0: refused, naming `x` */
    st = singlora_forward(SINGLORA_DTYPE_BF16, 0, 16, 64, 64, 8, 0, 64, 0x10000, 0x20000, 64, 0,
                          1.0f, 0, 1.0f, 0.0, 0, 0, NULL);
    EXPECT(st == SINGLORA_ERROR_INVALID_ARGUMENT);
    EXPECT(strstr(singlora_last_error(), "`x`") != NULL);
    printf("forward(x = NULL): %s: %s\n", singlora_status_name(st), singlora_last_error());

    st = singlora_backward(77, 0, 16, 64, 64, 8, 0x10000, 64, 0x20000, 64, 0x30000, 0, 1.0f,
                           0, 0, 0, 0.0f, 0x40000, 0.0f, 0x50000, 1u << 30, 0.0, 0, 0,
                           SINGLORA_BACKWARD_SPLIT, NULL);
    EXPECT(st == SINGLORA_ERROR_UNKNOWN_DTYPE);

    /* an unknown kernel code: refused, naming `kernel` */
    st = singlora_backward(SINGLORA_DTYPE_BF16, 0, 16, 64, 64, 8, 0x10000, 64, 0x20000, 64,
                           0x30000, 0, 1.0f, 0, 0, 0, 0.0f, 0x40000, 0.0f, 0x50000, 1u << 30,
                           0.0, 0, 0, 7, NULL);
    EXPECT(st == SINGLORA_ERROR_INVALID_ARGUMENT);
    EXPECT(strstr(singlora_last_error(), "`kernel`") != NULL);

    st = singlora_merge(SINGLORA_DTYPE_F16, 0, 64, 64, 8, 0x10000, -1, 0x20000, 1.0f, 0, NULL);
    EXPECT(st == SINGLORA_ERROR_INVALID_ARGUMENT);
    EXPECT(strstr(singlora_last_error(), "`ld_w`") != NULL);

    /* valid arguments on a device that does not exist */
    st = singlora_unmerge(SINGLORA_DTYPE_F32, 1000, 64, 64, 8, 0x10000, 64, 0x20000, 1.0f, 0, NULL);
    EXPECT(st == SINGLORA_ERROR_NO_DRIVER || st == SINGLORA_ERROR_NO_DEVICE);
    printf("unmerge(device 1000): %s: %s\n", singlora_status_name(st), singlora_last_error());
    st = singlora_init(1000);
    EXPECT(st == SINGLORA_ERROR_NO_DRIVER || st == SINGLORA_ERROR_NO_DEVICE);

    printf("%s\n", failures ? "C PROGRAM FAILED" : "C PROGRAM OK");
    return failures != 0;
}
"#;

#[test]
fn library_exports_and_a_c_program_agree_with_the_header() {
    let Some(src) = sources() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rust = rust_exports(&src.exports);
    let mut names: Vec<String> = rust.iter().map(|p| p.name.clone()).collect();
    names.sort();
    let defines = header_defines(&src.header);

    // The library exports exactly those singlora_* symbols.
    let (dir, in_cargo) = cdylib_dir();
    let Some(dir) = dir else {
        assert!(
            !in_cargo,
            "libsinglora.so not found next to the test executable (Cargo.toml's crate-type \
             must list cdylib)"
        );
        println!("skipped: no libsinglora.so beside this test executable");
        return;
    };
    let lib = dir.join("libsinglora.so");
    if let Ok(out) = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&lib)
        .output()
    {
        if out.status.success() {
            let mut exported: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().last())
                .filter(|s| s.starts_with("singlora_"))
                .map(str::to_string)
                .collect();
            exported.sort();
            assert_eq!(exported, names, "libsinglora.so's exports vs the header");
        }
    }

    // A C99 program: the codes, the prototypes (redeclared from the table:
    // a disagreement with the header is a compile error), and calls.
    let tmp = std::env::temp_dir().join(format!("singlora-capi-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut c = String::from("#include \"singlora.h\"\n\n");
    c += "#define CHECK(name, cond) typedef char name[(cond) ? 1 : -1]\n";
    for (name, value) in &defines {
        c += &format!("CHECK(check_{name}, {name} == {value});\n");
    }
    // Every table function must already be declared by the header (C99
    // has no implicit declarations) before the table's redeclarations.
    c += "typedef void (*any_function)(void);\nconst any_function every_function[] = {\n";
    for p in &rust {
        c += &format!("    (any_function)&{},\n", p.name);
    }
    c += "};\n";
    for p in &rust {
        c += &p.to_c();
        c += "\n";
    }
    c += &format!(
        "#define EXPECTED_VERSION \"{}\"\n#define EXPECTED_WS_BYTES {}ull\n",
        env!("CARGO_PKG_VERSION"),
        ws_bytes(16384, 4096, 4096, 64, true)
    );
    c += C_MAIN;
    let src = tmp.join("capi_check.c");
    std::fs::write(&src, &c).unwrap();
    let exe = tmp.join("capi_check");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    if !in_cargo && Command::new(&cc).arg("--version").output().is_err() {
        println!("skipped: no C compiler ({cc}) on this machine");
        return;
    }
    run(Command::new(&cc)
        .args([
            "-std=c99",
            "-pedantic",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wstrict-prototypes",
        ])
        .arg("-I")
        .arg(root.join("include"))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&dir)
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .arg("-lsinglora"));
    let out = run(&mut Command::new(&exe));
    println!("{out}");
    assert!(out.contains("C PROGRAM OK"), "{out}");

    // The header also compiles as C++ (extern "C"), where a C++ compiler is.
    if Command::new("c++").arg("--version").output().is_ok() {
        let cpp = tmp.join("capi_check.cpp");
        std::fs::write(&cpp, "#include \"singlora.h\"\nint main() { return singlora_abi_version() != SINGLORA_ABI_VERSION; }\n").unwrap();
        run(Command::new("c++")
            .args(["-std=c++11", "-Wall", "-Wextra", "-Werror", "-fsyntax-only"])
            .arg("-I")
            .arg(root.join("include"))
            .arg(&cpp));
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
