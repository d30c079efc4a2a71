//! Replays every input a fuzz target failed on, on stable and without
//! libFuzzer: the files under `vmm-core/fuzz/regressions/`, named after their
//! target (`decoder-1`, `validation-1`, ...), go through the same checks as
//! in the fuzz targets (`vmm-core/fuzz/src/lib.rs`, included here).

use std::path::Path;

use bytes::BytesMut;
use serde_json::json;
use vmm_core::connection::{Frame, FrameDecoder};

#[path = "../fuzz/src/lib.rs"]
mod fuzz;

#[test]
fn saved_fuzz_inputs_pass_their_checks() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", dir.display()))
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .unwrap();
    paths.sort();
    assert!(!paths.is_empty(), "no inputs in {}", dir.display());
    for path in paths {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let data = std::fs::read(&path).unwrap();
        eprintln!("replaying {name}");
        match name.split_once('-').map(|(target, _)| target) {
            Some("decoder") => fuzz::decoder(&data),
            Some("validation") => fuzz::validation(&data),
            _ => panic!("{name}: a regression input is named <target>-<n>"),
        }
    }
}

/// `decoder-1`, spelled out: a number, `true`, `false` or `null` of exactly
/// the limit's length was `TooLarge`, because the byte after it (which ends
/// it and is not part of it) was counted. Objects, arrays and strings of
/// exactly the limit were fine.
#[test]
fn a_scalar_of_exactly_the_limit_is_not_too_large() {
    let mut decoder = FrameDecoder::new(3);
    let mut buf = BytesMut::from(&b"0.0\nnull\n"[..]);
    assert_eq!(decoder.decode(&mut buf), Some(Frame::Value(json!(0.0))));
    assert_eq!(decoder.decode(&mut buf), Some(Frame::TooLarge));

    let mut decoder = FrameDecoder::new(4);
    let mut buf = BytesMut::from(&b"true{\"a\":1}"[..]);
    assert_eq!(decoder.decode(&mut buf), Some(Frame::Value(json!(true))));
}
