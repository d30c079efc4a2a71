//! Replays every input a fuzz target failed on, and seeds for cases that
//! matter, on stable and without libFuzzer: the files under
//! `vmm-core/fuzz/regressions/`, named after their target (`decoder-1`,
//! `validation-1`, ...), go through the same checks as in the fuzz targets
//! (`vmm-core/fuzz/src/lib.rs`, included here).

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

/// `decoder-2` to `decoder-6` are seeds rather than failures: the streams of
/// issue 7 (unfinished values followed by a newline), in raw mode, which the
/// replay above checks for split-independence and resynchronisation. Here
/// what they decode to, spelled out. (`decoder-7` and `decoder-8` are
/// generated-mode inputs, whose check already names the frames expected.)
#[test]
fn the_unfinished_value_seeds_decode_as_issue_7_says() {
    use Frame::{Invalid, Value};
    let ping = |id: i64| Value(json!({"command": "ping", "id": id}));
    let cases = [
        ("decoder-2", vec![Invalid, ping(2)]),
        (
            "decoder-3",
            vec![Invalid, ping(1), Invalid, ping(2), Invalid, ping(3)],
        ),
        (
            "decoder-4",
            vec![Invalid, ping(1), Invalid, Invalid, Value(json!({"id": 2}))],
        ),
        (
            "decoder-5",
            vec![
                Invalid,
                Value(json!({"b": 2})),
                Invalid,
                Value(json!({"c": 3})),
                Invalid,
                Value(json!("x")),
                Value(json!(7)),
                Value(json!({"e": 4})),
            ],
        ),
        (
            "decoder-6",
            vec![
                Value(json!({
                    "command": "register",
                    "data": {"disks": [{"disk_size": 1}, {"disk_size": 2}]},
                    "id": [{}],
                })),
                Invalid,
                Value(json!({"a": 1})),
                Invalid,
            ],
        ),
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    for (name, expected) in cases {
        let data = std::fs::read(dir.join(name)).unwrap();
        // The mode and limit byte (raw, 4096), then the split seed.
        assert_eq!(data[0], 7 << 1, "{name}");
        let mut decoder = FrameDecoder::new(4096);
        let mut buf = BytesMut::from(&data[9..]);
        let frames: Vec<Frame> = std::iter::from_fn(|| decoder.decode(&mut buf)).collect();
        assert_eq!(frames, expected, "{name}");
    }
}
