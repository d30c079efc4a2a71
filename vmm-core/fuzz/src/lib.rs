//! The checks behind the fuzz targets, as plain functions of the fuzz input.
//!
//! They use only vmm-core and crates vmm-core itself depends on, so that
//! `vmm-core/tests/fuzz_regressions.rs` can include this file as a module and
//! replay every input saved under `vmm-core/fuzz/regressions/` with
//! `cargo test`, on stable, without libFuzzer.
//!
//! Inputs are interpreted by [`Source`], a cursor that hands out bytes and
//! reads zeros once the input is exhausted, so every input is valid and
//! generation always terminates.

use bytes::BytesMut;
use serde::Deserialize;
use serde_json::{Map, Value};
use vmm_core::Request;
use vmm_core::connection::{Frame, FrameDecoder};
use vmm_core::params;
use vmm_core::protocol::{Data, ErrorCode, limits};

/// Request limits the decoder is exercised with. Small ones make the
/// `TooLarge` boundary reachable; 4096 lets whole requests through.
const MAX_LENS: [usize; 8] = [1, 2, 3, 8, 16, 64, 512, 4096];

/// A cursor over the fuzz input.
pub struct Source<'a> {
    data: &'a [u8],
}

impl<'a> Source<'a> {
    pub fn new(data: &'a [u8]) -> Source<'a> {
        Source { data }
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&byte, rest)) => {
                self.data = rest;
                byte
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        for byte in &mut bytes {
            *byte = self.u8();
        }
        u64::from_le_bytes(bytes)
    }

    /// A number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        // One byte per choice for small ranges: easier for the fuzzer to
        // mutate one decision at a time.
        if n <= 256 {
            return usize::from(self.u8()) % n;
        }
        (usize::from(self.u8()) | (usize::from(self.u8()) << 8)) % n
    }

    fn rest(self) -> &'a [u8] {
        self.data
    }
}

// ---------------------------------------------------------------------------
// The decoder.

/// Decodes `stream` fed in chunks whose sizes come from `next_chunk`,
/// draining the decoder after every chunk as `Connection` does.
fn decode_in_chunks(
    stream: &[u8],
    max_len: usize,
    next_chunk: impl FnMut() -> usize,
) -> Vec<Frame> {
    decode_with(&mut FrameDecoder::new(max_len), stream, max_len, next_chunk)
}

/// [`decode_in_chunks`] with a decoder the caller can inspect afterwards.
fn decode_with(
    decoder: &mut FrameDecoder,
    stream: &[u8],
    max_len: usize,
    mut next_chunk: impl FnMut() -> usize,
) -> Vec<Frame> {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let size = next_chunk().clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        buf.extend_from_slice(chunk);
        assert!(
            buf.len() <= max_len + size,
            "buffer of {} bytes with a limit of {max_len} and a chunk of {size}",
            buf.len()
        );
        while let Some(frame) = decoder.decode(&mut buf) {
            frames.push(frame);
        }
        // What stays buffered is the start of one value, at most the limit.
        assert!(
            buf.len() <= max_len,
            "{} bytes stay buffered with a limit of {max_len}",
            buf.len()
        );
    }
    frames
}

/// A tiny PRNG so that one seed from the input gives a long split pattern.
fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// Checks the frames of one stream: nothing after `TooLarge`, every value
/// re-serialises to itself, and `Request::from_value` copes with it.
fn check_frames(frames: &[Frame]) {
    if let Some(at) = frames.iter().position(|f| *f == Frame::TooLarge) {
        assert_eq!(at + 1, frames.len(), "frames after TooLarge: {frames:?}");
    }
    for frame in frames {
        if let Frame::Value(value) = frame {
            let text = serde_json::to_vec(value).expect("a decoded value serialises");
            let back: Value = serde_json::from_slice(&text).expect("and parses back");
            assert!(same(value, &back), "{value} came back as {back}");
            check_request_shape(value);
        }
    }
}

/// The fuzz target `decoder`. The first byte picks the mode and the limit:
///
/// - raw: the rest (after an 8-byte split seed) is a byte stream. Decoding it
///   at once, in chunks sized by the seed, and one byte at a time must give
///   the same frames. And whatever the stream left unfinished, a newline and
///   a request line after it give one frame for the unfinished value (none
///   if there was none), then the request: nothing swallows it (see
///   [`check_resync`]).
/// - generated: the rest describes JSON values, which are serialised
///   (compact or pretty, with or without separators) into a stream that must
///   decode to exactly those values, or `TooLarge` for the first one over the
///   limit. Some values come after an unfinished one (a cut-off object or
///   array, then a newline), which must be `Invalid`.
pub fn decoder(data: &[u8]) {
    let mut src = Source::new(data);
    let head = src.u8();
    let max_len = MAX_LENS[usize::from(head >> 1) % MAX_LENS.len()];
    if head & 1 == 0 {
        let mut seed = src.u64() | 1;
        let stream = src.rest();
        let whole = decode_in_chunks(stream, max_len, || usize::MAX);
        check_frames(&whole);
        let chunked = decode_in_chunks(stream, max_len, || {
            let r = xorshift(&mut seed);
            // Mostly small chunks, sometimes large ones.
            if r & 3 == 0 {
                (r >> 8) as usize % 4096
            } else {
                (r >> 8) as usize % 9
            }
        });
        assert_eq!(chunked, whole, "chunked differs from whole");
        let bytewise = decode_in_chunks(stream, max_len, || 1);
        assert_eq!(bytewise, whole, "byte at a time differs from whole");
        check_resync(stream, max_len, &whole);
    } else {
        let max_len = if head & 0x80 == 0 { 4096 } else { max_len };
        let count = src.below(6) + 1;
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        let mut previous_scalar = false;
        for _ in 0..count {
            let value = gen_value(&mut src, 0);
            let style = src.u8();
            // Bit 7: an unfinished value and a newline between the separator
            // and an object, which then starts in the first column.
            let unfinished = match &value {
                Value::Object(_) if style & 0x80 != 0 => {
                    let cut = gen_unfinished(&mut src);
                    // With the newline within the limit, or it is `TooLarge`.
                    (cut.len() < max_len).then_some(cut)
                }
                _ => None,
            };
            let text = if style & 1 == 0 {
                serde_json::to_vec(&value)
            } else {
                serde_json::to_vec_pretty(&value)
            }
            .expect("a generated value serialises");
            let scalar = !matches!(value, Value::Object(_) | Value::Array(_) | Value::String(_));
            // Two numbers or literals in a row need a separator, or they
            // would be one token.
            let separator: &[u8] = match (style >> 1) % 6 {
                0 if !(scalar && previous_scalar) => b"",
                0 | 1 => b"\n",
                2 => b" ",
                3 => b"\r\n",
                4 => b"\t \n\n",
                _ => b"  ",
            };
            stream.extend_from_slice(separator);
            if let Some(cut) = unfinished {
                stream.extend_from_slice(&cut);
                stream.push(b'\n');
                expected.push(Want::Invalid);
            }
            stream.extend_from_slice(&text);
            previous_scalar = scalar;
            if text.len() > max_len {
                expected.push(Want::TooLarge);
                break;
            }
            expected.push(Want::Value(value));
        }
        // A number at the very end is only complete once something follows.
        stream.push(b'\n');
        let mut seed = src.u64() | 1;
        for frames in [
            decode_in_chunks(&stream, max_len, || usize::MAX),
            decode_in_chunks(&stream, max_len, || (xorshift(&mut seed) % 7) as usize),
        ] {
            check_frames(&frames);
            let matches = frames.len() == expected.len()
                && frames
                    .iter()
                    .zip(&expected)
                    .all(|(got, want)| match (got, want) {
                        (Frame::Value(got), Want::Value(want)) => same(got, want),
                        (Frame::Invalid, Want::Invalid) | (Frame::TooLarge, Want::TooLarge) => true,
                        _ => false,
                    });
            assert!(
                matches,
                "limit {max_len}, stream {:?}\nexpected {expected:?}\n     got {frames:?}",
                String::from_utf8_lossy(&stream)
            );
        }
    }
}

/// What a generated stream must decode to, frame by frame.
#[derive(Debug)]
enum Want {
    Value(Value),
    Invalid,
    TooLarge,
}

/// A generated object or array cut off before its end: compact or pretty,
/// cut anywhere (in a string, an escape, a number, a literal, between
/// tokens), so it is never complete.
fn gen_unfinished(src: &mut Source) -> Vec<u8> {
    let value = match gen_value(src, 0) {
        value @ (Value::Object(_) | Value::Array(_)) => value,
        other => Value::Array(vec![other]),
    };
    let text = if src.u8() & 1 == 0 {
        serde_json::to_vec(&value)
    } else {
        serde_json::to_vec_pretty(&value)
    }
    .expect("a generated value serialises");
    let cut = 1 + src.below(text.len() - 1);
    text[..cut].to_vec()
}

/// The issue-7 promise for any input: `stream`, then a newline and a request
/// on a line of its own, decodes to the frames of `stream` (`whole`), one
/// frame for the value `stream` left unfinished if it left one (`Invalid`,
/// or a scalar that the newline ends), and the request. Only `TooLarge` may
/// come instead, for the unfinished value.
fn check_resync(stream: &[u8], max_len: usize, whole: &[Frame]) {
    const REQUEST: &[u8] = b"{}";
    if max_len < REQUEST.len() {
        return;
    }
    let mut decoder = FrameDecoder::new(max_len);
    let frames = decode_with(&mut decoder, stream, max_len, || usize::MAX);
    assert_eq!(frames, whole);
    let pending = decoder.in_value();
    let mut extended = stream.to_vec();
    extended.push(b'\n');
    extended.extend_from_slice(REQUEST);
    extended.push(b'\n');
    let frames = decode_in_chunks(&extended, max_len, || usize::MAX);
    assert_eq!(
        frames.get(..whole.len()),
        Some(whole),
        "the frames before the request changed"
    );
    let after = &frames[whole.len()..];
    if whole.last() == Some(&Frame::TooLarge) {
        assert!(after.is_empty(), "{after:?} after TooLarge");
        return;
    }
    match (pending, after) {
        (true, [Frame::TooLarge]) => {}
        (true, [Frame::Invalid | Frame::Value(_), Frame::Value(request)])
        | (false, [Frame::Value(request)])
            if request == &serde_json::json!({}) => {}
        _ => panic!(
            "{:?} then a newline and {{}}: after {whole:?} came {after:?} (a value was {}pending)",
            String::from_utf8_lossy(stream),
            if pending { "" } else { "not " },
        ),
    }
}

/// JSON equality, with floats equal when they are a few ULPs apart:
/// serde_json (without its `float_roundtrip` feature) may read back a float
/// it wrote, subnormals especially, a few ULPs off. That is not the decoder's
/// doing.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => {
                    x == y
                        || (x.is_sign_negative() == y.is_sign_negative()
                            && x.to_bits().abs_diff(y.to_bits()) <= 64)
                }
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((kx, vx), (ky, vy))| kx == ky && same(vx, vy))
        }
        _ => a == b,
    }
}

const CHARS: [char; 24] = [
    'a', 'Z', '0', '9', '-', '.', '_', ' ', '"', '\\', '{', '}', '[', ']', ',', ':', '\n', '\t',
    '\r', '\0', '\u{7f}', 'é', '€', '😀',
];

const WORDS: [&str; 16] = [
    "command",
    "data",
    "id",
    "ping",
    "register",
    "update",
    "authenticate",
    "vm_id",
    "ram",
    "cpu",
    "password",
    "disks",
    "disk_size",
    "list_type",
    "topics",
    "securePass123-hunter2",
];

fn gen_string(src: &mut Source) -> String {
    let mut text = String::new();
    for _ in 0..src.below(20) {
        match src.below(8) {
            0 => text.push_str(WORDS[src.below(WORDS.len())]),
            1 => text.push(
                char::from_u32(u32::from(src.u8()) << 8 | u32::from(src.u8())).unwrap_or('?'),
            ),
            _ => text.push(CHARS[src.below(CHARS.len())]),
        }
    }
    text
}

const INTS: [i64; 16] = [
    0, 1, -1, 7, 8, 64, 65, 128, 129, 512, 1024, 1025, 1_048_576, 1_048_577, 4_194_304, 4_194_305,
];

fn gen_number(src: &mut Source) -> Value {
    match src.below(6) {
        0 => Value::from(INTS[src.below(INTS.len())]),
        1 => Value::from(src.u64()),
        2 => Value::from(src.u64() as i64),
        3 => Value::from(i64::MIN + src.below(3) as i64),
        4 => Value::from(f64::from_bits(src.u64())), // non-finite becomes null
        _ => Value::from(src.below(1000) as f64 / 8.0),
    }
}

fn gen_value(src: &mut Source, depth: usize) -> Value {
    // Bounded well below serde_json's nesting limit of 128.
    let kinds = match depth {
        0..4 => 8,
        4 => 7,
        _ => 5,
    };
    match src.below(kinds) {
        0 => Value::Null,
        1 => Value::Bool(src.u8() & 1 == 1),
        2 => gen_number(src),
        3 | 4 => Value::String(gen_string(src)),
        5 => Value::Array(
            (0..src.below(5))
                .map(|_| gen_value(src, depth + 1))
                .collect(),
        ),
        6 => {
            let mut map = Map::new();
            for _ in 0..src.below(5) {
                let key = gen_key(src);
                map.insert(key, gen_value(src, depth + 1));
            }
            Value::Object(map)
        }
        _ => gen_request(src, depth + 1),
    }
}

fn gen_key(src: &mut Source) -> String {
    if src.u8() & 3 != 0 {
        WORDS[src.below(WORDS.len())].to_owned()
    } else {
        gen_string(src)
    }
}

// ---------------------------------------------------------------------------
// Requests and their parameters.

/// `register`'s parameters (a copy of the private struct in
/// `commands/register.rs`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterParams {
    vm_id: String,
    ram: i64,
    cpu: i64,
    password: String,
    #[serde(default)]
    disks: Vec<NewDisk>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDisk {
    disk_size: i64,
}

/// `update`'s parameters (a copy of `commands/update.rs`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateParams {
    ram: Option<i64>,
    cpu: Option<i64>,
    disks: Option<Vec<DiskChange>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskChange {
    id: Option<i64>,
    disk_size: i64,
}

/// Shaped like `authenticate`'s parameters (a password or a token).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginLike {
    vm_id: String,
    password: Option<String>,
    #[allow(dead_code)]
    token: Option<String>,
}

/// Shaped like `list`'s parameters.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ListLike {
    list_type: String,
    token: Option<String>,
}

/// Shaped like `watch`'s parameters.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct WatchLike {
    topics: Option<Vec<String>>,
}

type Checked = Result<(), vmm_core::Error>;

/// `register`'s validation, in its order.
fn validate_register(p: RegisterParams) -> Checked {
    params::vm_id(&p.vm_id)?;
    params::ram(p.ram)?;
    params::cpu(p.cpu)?;
    params::password(&p.password)?;
    if p.disks.len() > limits::MAX_DISKS {
        return Err(vmm_core::Error::invalid_params("too many disks"));
    }
    for (i, disk) in p.disks.iter().enumerate() {
        params::disk_size(&format!("disks[{i}].disk_size"), disk.disk_size)?;
    }
    Ok(())
}

/// `update`'s validation, in its order.
fn validate_update(p: UpdateParams) -> Checked {
    if p.ram.is_none() && p.cpu.is_none() && p.disks.is_none() {
        return Err(vmm_core::Error::invalid_params("nothing to update"));
    }
    p.ram.map(params::ram).transpose()?;
    p.cpu.map(params::cpu).transpose()?;
    let disks = p.disks.unwrap_or_default();
    if disks.len() > limits::MAX_DISKS {
        return Err(vmm_core::Error::invalid_params("too many disks"));
    }
    let mut named = std::collections::HashSet::new();
    for (i, disk) in disks.iter().enumerate() {
        params::disk_size(&format!("disks[{i}].disk_size"), disk.disk_size)?;
        if let Some(id) = disk.id
            && !named.insert(id)
        {
            return Err(vmm_core::Error::invalid_params(format!(
                "`disks[{i}].id`: disk {id} is named twice"
            )));
        }
    }
    Ok(())
}

fn validate_login(p: LoginLike) -> Checked {
    params::vm_id(&p.vm_id)?;
    p.password.as_deref().map(params::password).transpose()?;
    Ok(())
}

/// Parses `data` into `T` and validates it; the error, if any.
fn outcome<T: serde::de::DeserializeOwned>(
    data: &Data,
    validate: impl FnOnce(T) -> Checked,
) -> Option<vmm_core::Error> {
    params::parse::<T>(data.clone()).and_then(validate).err()
}

/// Every error message the request gives: its shape's, or each command
/// shape's parse and validation errors.
fn messages(value: &Value) -> Vec<String> {
    let request = match Request::from_value(value.clone()) {
        Ok(request) => request,
        Err((code, message, _)) => return vec![format!("{code}: {message}")],
    };
    let data = &request.data;
    let errors = [
        outcome(data, validate_register),
        outcome(data, validate_update),
        outcome(data, validate_login),
        outcome(data, |_: ListLike| Ok(())),
        outcome(data, |_: WatchLike| Ok(())),
        outcome(data, |_: params::Empty| Ok(())),
    ];
    let mut messages = Vec::new();
    for error in errors.into_iter().flatten() {
        assert_eq!(error.code, ErrorCode::InvalidParams, "{error}");
        assert!(!error.message.is_empty());
        let line = error.clone().into_reply().to_line();
        let back: Value = serde_json::from_slice(&line).expect("an error reply is JSON");
        assert_eq!(back["message"], Value::from(error.message.as_ref()));
        messages.push(error.message.into_owned());
    }
    messages
}

/// `Request::from_value`: never panics, an error keeps a readable `id`, and
/// a request survives `to_value` and back.
fn check_request_shape(value: &Value) {
    match Request::from_value(value.clone()) {
        Ok(request) => {
            let again = Request::from_value(request.to_value());
            assert_eq!(again.as_ref(), Ok(&request), "to_value does not round-trip");
        }
        Err((code, message, id)) => {
            assert_eq!(code, ErrorCode::InvalidRequest);
            assert!(!message.is_empty());
            let sent = value.get("id");
            match sent {
                Some(sent @ (Value::String(_) | Value::Number(_) | Value::Null)) => {
                    assert_eq!(id.as_ref(), Some(sent), "the error lost the id");
                }
                _ => assert_eq!(id, None),
            }
        }
    }
}

/// Every string value (not object key) in `value`.
fn string_values<'v>(value: &'v Value, out: &mut Vec<&'v str>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|v| string_values(v, out)),
        Value::Object(map) => map.values().for_each(|v| string_values(v, out)),
        _ => {}
    }
}

/// Every string value equal to `from` replaced by `to`.
fn replace_strings(value: &Value, from: &str, to: &str) -> Value {
    match value {
        Value::String(s) if s == from => Value::String(to.to_owned()),
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| replace_strings(v, from, to)).collect())
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), replace_strings(v, from, to)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A string of the same length in characters (and for ASCII, in bytes) in
/// which every character differs, but stays in its class (letter, digit,
/// vm_id punctuation, other), so that the validators judge it alike.
fn disguise(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            'a'..='y' | 'A'..='Y' | '0'..='8' => char::from(c as u8 + 1),
            'z' => 'a',
            'Z' => 'A',
            '9' => '0',
            '.' => '_',
            '_' => '-',
            '-' => '.',
            '~' => '!',
            c if c.is_ascii() => '~',
            'é' => 'ü',
            _ => 'é',
        })
        .collect()
}

/// Whether `vm_id` should be accepted, from the protocol's rule.
fn vm_id_is_valid(text: &str) -> bool {
    (1..=limits::VM_ID_MAX_LEN).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The fuzz target `validation`. The first byte picks the mode: the rest is
/// JSON text, or describes a request built to look like the real ones.
pub fn validation(data: &[u8]) {
    let mut src = Source::new(data);
    let value = if src.u8() & 1 == 0 {
        match serde_json::from_slice::<Value>(src.rest()) {
            Ok(value) => value,
            Err(_) => return,
        }
    } else {
        gen_request(&mut src, 0)
    };
    check_request(&value);
}

/// The checks on one request value; also what the replay test calls for a
/// saved `validation-*` input that is JSON.
pub fn check_request(value: &Value) {
    check_request_shape(value);
    let found = messages(value);

    let mut strings = Vec::new();
    string_values(value, &mut strings);
    for text in &strings {
        // The validators agree with the rules they stand for.
        assert_eq!(
            params::vm_id(text).is_ok(),
            vm_id_is_valid(text),
            "{text:?}"
        );
        assert_eq!(
            params::password(text).is_ok(),
            limits::PASSWORD_LEN.contains(&text.chars().count()),
            "{text:?}"
        );
    }
    // No message repeats a long string value. A message may contain such a
    // string by coincidence (it is part of a field name or of the message's
    // own words), so a hit is confirmed by changing the string: a message
    // that echoes the value then contains the changed string.
    for text in strings {
        if text.chars().count() <= 12 || !found.iter().any(|m| m.contains(text)) {
            continue;
        }
        let changed = disguise(text);
        let again = messages(&replace_strings(value, text, &changed));
        if let Some(leak) = again.iter().find(|m| m.contains(&changed)) {
            panic!("an error message repeats the value {text:?}: {leak:?} (for {value})");
        }
    }
    for number in numbers(value) {
        for (name, result, range) in [
            ("ram", params::ram(number), limits::RAM),
            ("cpu", params::cpu(number), limits::CPU),
            (
                "disk_size",
                params::disk_size("disk_size", number),
                limits::DISK_SIZE,
            ),
        ] {
            match result {
                Ok(n) => assert!(
                    range.contains(&number) && i64::from(n) == number,
                    "{name} {number}"
                ),
                Err(e) => {
                    assert!(!range.contains(&number), "{name} {number}: {e}");
                    assert_eq!(e.code, ErrorCode::InvalidParams);
                }
            }
        }
    }
}

fn numbers(value: &Value) -> Vec<i64> {
    let mut out = Vec::new();
    fn walk(value: &Value, out: &mut Vec<i64>) {
        match value {
            Value::Number(n) => out.extend(n.as_i64()),
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            Value::Object(map) => map.values().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(value, &mut out);
    out
}

const COMMANDS: [&str; 9] = [
    "register",
    "update",
    "authenticate",
    "list",
    "watch",
    "ping",
    "logout",
    "help",
    "",
];

const FIELDS: [&str; 10] = [
    "vm_id",
    "token",
    "ram",
    "cpu",
    "password",
    "disks",
    "list_type",
    "topics",
    "id",
    "disk_size",
];

/// A request-like object: mostly the right keys, some wrong types and
/// values, long strings where passwords go.
fn gen_request(src: &mut Source, depth: usize) -> Value {
    let mut request = Map::new();
    let flags = src.u8();
    if flags & 1 == 0 {
        let command = if flags & 2 == 0 {
            Value::from(COMMANDS[src.below(COMMANDS.len())])
        } else {
            gen_field(src, depth + 1)
        };
        request.insert("command".into(), command);
    }
    if flags & 4 == 0 {
        request.insert("data".into(), gen_data(src, depth + 1));
    } else if flags & 8 == 0 {
        request.insert("data".into(), gen_value(src, depth + 1));
    }
    if flags & 16 == 0 {
        request.insert("id".into(), gen_field(src, depth + 1));
    }
    if flags & 32 == 0 {
        request.insert(gen_key(src), gen_field(src, depth + 1));
    }
    Value::Object(request)
}

fn gen_data(src: &mut Source, depth: usize) -> Value {
    let mut data = Map::new();
    for _ in 0..src.below(7) {
        let key = if src.u8() & 7 == 0 {
            gen_string(src)
        } else {
            FIELDS[src.below(FIELDS.len())].to_owned()
        };
        let value = if key == "disks" && depth <= 1 && src.u8() & 1 == 0 {
            Value::Array(
                (0..src.below(4))
                    .map(|_| gen_data(src, depth + 2))
                    .collect(),
            )
        } else {
            gen_field(src, depth + 1)
        };
        data.insert(key, value);
    }
    Value::Object(data)
}

/// A field value: usually a scalar, often a long string.
fn gen_field(src: &mut Source, depth: usize) -> Value {
    match src.below(8) {
        0 | 1 => gen_number(src),
        2 => Value::String(long_string(src)),
        3 => Value::String(gen_string(src)),
        _ if depth > 4 => Value::Null,
        _ => gen_value(src, depth + 1),
    }
}

/// A password-like string of 13 to 140 characters.
fn long_string(src: &mut Source) -> String {
    let len = 13 + src.below(128);
    let seed = src.u8();
    (0..len)
        .map(|i| match (usize::from(seed) + i) % 5 {
            0 => CHARS[(usize::from(seed) + i) % CHARS.len()],
            _ => char::from(b'a' + ((usize::from(seed) * 7 + i) % 26) as u8),
        })
        .collect()
}
