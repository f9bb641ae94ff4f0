//! The dropout mask's generator, checked without a GPU:
//!
//! * the Rust Philox4x32-10 ([`singlora::dropout::philox4x32_10`], the f64
//!   reference's) against the published known-answer vectors of Random123;
//! * the CUDA header the kernels use (kernels/common/philox.cuh), compiled
//!   as host C++ with the system compiler (`$CXX`, else `c++`), against the
//!   Rust generator and the same vectors, word for word, for the raw
//!   generator and for the dropout mapping (seed, offset, token, column)
//!   over many inputs.
//!
//! Host-only (scripts/bundle.sh leaves it out of the GPU bundle): it reads
//! the kernel source tree and runs a C++ compiler.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use singlora::dropout::philox4x32_10;
use singlora::Dropout;

/// Random123's known-answer vectors for Philox4x32-10: tests/kat_vectors of
/// https://github.com/DEShawResearch/random123 (commit 9545ff6413f2, lines
/// 27-29), columns `CTR[4] KEY[2] EXPECTED[4]`:
///
/// ```text
/// philox4x32 10 00000000 00000000 00000000 00000000 00000000 00000000   6627e8d5 e169c58d bc57ac4c 9b00dbd8
/// philox4x32 10 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff   408f276d 41c83b0e a20bc7c6 6d5451fd
/// philox4x32 10 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0   d16cfe09 94fdcceb 5001e420 24126ea1
/// ```
const KAT: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
    (
        [0x0000_0000, 0x0000_0000, 0x0000_0000, 0x0000_0000],
        [0x0000_0000, 0x0000_0000],
        [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8],
    ),
    (
        [0xffff_ffff, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff],
        [0xffff_ffff, 0xffff_ffff],
        [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd],
    ),
    (
        [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
        [0xa409_3822, 0x299f_31d0],
        [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1],
    ),
];

#[test]
fn rust_philox_matches_random123_known_answers() {
    for (ctr, key, expected) in KAT {
        assert_eq!(
            philox4x32_10(ctr, key),
            expected,
            "ctr {ctr:08x?} key {key:08x?}"
        );
    }
}

#[test]
fn dropout_words_follow_the_documented_mapping() {
    // key = (seed lo, seed hi), counter = (col / 4, token lo, offset lo, offset hi).
    let d = Dropout::new(0.5, 0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210).unwrap();
    assert_eq!(
        d.words(77, 5),
        philox4x32_10(
            [5, 77, 0x7654_3210, 0xfedc_ba98],
            [0x89ab_cdef, 0x0123_4567]
        )
    );
    let w = d.words(77, 5);
    for (j, &word) in w.iter().enumerate() {
        assert_eq!(d.keeps(77, 20 + j), word >= d.threshold());
    }
}

/// The C++ driver: reads lines `K c0 c1 c2 c3 k0 k1` (raw generator) or
/// `D seed offset token col4` (the dropout mapping), all decimal, and
/// prints the four words in hex, one line each.
const DRIVER: &str = r#"
#include "common/philox.cuh"
#include <stdio.h>

int main() {
    char kind;
    while (scanf(" %c", &kind) == 1) {
        singlora::Philox4 w;
        if (kind == 'K') {
            unsigned c0, c1, c2, c3, k0, k1;
            if (scanf("%u %u %u %u %u %u", &c0, &c1, &c2, &c3, &k0, &k1) != 6) return 2;
            w = singlora::philox4x32_10(c0, c1, c2, c3, k0, k1);
        } else if (kind == 'D') {
            unsigned long long seed, offset;
            unsigned token, col4;
            if (scanf("%llu %llu %u %u", &seed, &offset, &token, &col4) != 4) return 2;
            w = singlora::dropout_words(seed, offset, token, col4);
        } else {
            return 3;
        }
        printf("%08x %08x %08x %08x\n", w.v[0], w.v[1], w.v[2], w.v[3]);
    }
    return 0;
}
"#;

fn compile_driver() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("singlora-philox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("driver.cpp");
    let exe = dir.join("driver");
    std::fs::write(&src, DRIVER).unwrap();
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args(["-std=c++11", "-O2", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(manifest.join("kernels"))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("could not run the host C++ compiler `{cxx}` ({e}); set CXX"));
    assert!(
        out.status.success(),
        "{cxx} could not compile kernels/common/philox.cuh as host C++:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn run_driver(exe: &PathBuf, input: &str) -> Vec<[u32; 4]> {
    let mut child = Command::new(exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let text = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "driver failed: {:?}", out.status);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let w: Vec<u32> = l
                .split_whitespace()
                .map(|h| u32::from_str_radix(h, 16).unwrap())
                .collect();
            [w[0], w[1], w[2], w[3]]
        })
        .collect()
}

/// SplitMix64, for reproducible inputs.
fn mix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn cuda_header_on_the_host_matches_the_rust_generator() {
    let exe = compile_driver();
    let mut input = String::new();
    let mut expected = Vec::new();
    // The known answers, through the header.
    for (c, k, want) in KAT {
        input += &format!("K {} {} {} {} {} {}\n", c[0], c[1], c[2], c[3], k[0], k[1]);
        expected.push(want);
    }
    // Random raw counters and keys.
    let mut st = 1u64;
    for _ in 0..20_000 {
        let c = [
            mix(&mut st) as u32,
            mix(&mut st) as u32,
            mix(&mut st) as u32,
            mix(&mut st) as u32,
        ];
        let k = [mix(&mut st) as u32, mix(&mut st) as u32];
        input += &format!("K {} {} {} {} {} {}\n", c[0], c[1], c[2], c[3], k[0], k[1]);
        expected.push(philox4x32_10(c, k));
    }
    // The dropout mapping: edge seeds, offsets, tokens and columns, then
    // random ones.
    let edges64 = [0u64, 1, u32::MAX as u64, 1 << 32, u64::MAX];
    let edges32 = [0u32, 1, 4095, u32::MAX];
    for &seed in &edges64 {
        for &offset in &edges64 {
            for &token in &edges32 {
                for &col4 in &edges32 {
                    input += &format!("D {seed} {offset} {token} {col4}\n");
                    expected.push(
                        Dropout::new(0.5, seed, offset)
                            .unwrap()
                            .words(token as u64, col4),
                    );
                }
            }
        }
    }
    for _ in 0..20_000 {
        let (seed, offset) = (mix(&mut st), mix(&mut st));
        let (token, col4) = (mix(&mut st) as u32, (mix(&mut st) % 4096) as u32);
        input += &format!("D {seed} {offset} {token} {col4}\n");
        expected.push(
            Dropout::new(0.1, seed, offset)
                .unwrap()
                .words(token as u64, col4),
        );
    }
    let got = run_driver(&exe, &input);
    assert_eq!(got.len(), expected.len(), "driver output lines");
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "line {i}: {}", input.lines().nth(i).unwrap());
    }
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
}
