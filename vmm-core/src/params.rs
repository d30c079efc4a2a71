//! Strict decoding of a request's `data` into a command's parameters.
//!
//! Types are strict (a number sent as a string or a float where an integer is
//! expected is refused) and unknown fields are refused. Error messages name
//! the field but never repeat the value sent, which could be a password.

use std::ops::RangeInclusive;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::protocol::{Data, limits};

/// Decodes `data` into `T`, which should use `deny_unknown_fields` and `i64`
/// for numbers (ranges are checked afterwards with [`ranged`]).
pub fn parse<T: DeserializeOwned>(data: Data) -> Result<T> {
    serde_path_to_error::deserialize::<_, T>(Value::Object(data))
        .map_err(|err| Error::invalid_params(describe(&err.path().to_string(), err.inner())))
}

/// Checks that `data` is empty, for commands that take no parameters. An
/// empty `data` (every `ping`) is accepted without building anything.
pub fn none(data: Data) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    parse::<Empty>(data).map(|Empty {}| ())
}

/// `data` for commands that take no parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let len = text[start..].find(close)?;
    Some(&text[start..start + len])
}

fn shorten(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(64).collect()
}

fn expected_in_words(expected: &str) -> &str {
    match expected {
        "i64" | "u64" | "i32" | "u32" => "an integer",
        "a string" => "a string",
        "a sequence" => "an array",
        "a boolean" => "true or false",
        e if e.starts_with("struct ") || e == "a map" => "an object",
        e => e,
    }
}

fn describe(path: &str, err: &serde_json::Error) -> String {
    let message = err.to_string();
    let field = |name: &str| match path {
        "." | "" => format!("`{name}`"),
        parent => format!("`{parent}.{name}`"),
    };
    if message.starts_with("missing field") {
        let name = between(&message, "`", "`").unwrap_or("?");
        return format!("{} is required", field(name));
    }
    if message.starts_with("unknown field") {
        return format!("`{}` is not a known field", shorten(path));
    }
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        let got = rest
            .split([' ', ','])
            .next()
            .map(|kind| {
                if kind == "floating" {
                    "a fraction"
                } else {
                    kind
                }
            })
            .unwrap_or("something else");
        let expected = rest.rsplit(", expected ").next().unwrap_or("another type");
        return format!(
            "`{path}` must be {}, not {}",
            expected_in_words(expected),
            match got {
                "string" => "a string",
                "integer" => "an integer",
                "boolean" => "a boolean",
                "map" => "an object",
                "sequence" => "an array",
                other => other,
            }
        );
    }
    if message.starts_with("invalid value") {
        return format!("`{path}` is out of range");
    }
    format!("`{path}` is invalid")
}

/// Checks an integer parameter against its range.
pub fn ranged(field: &str, value: i64, range: RangeInclusive<i64>, unit: &str) -> Result<u32> {
    if range.contains(&value) {
        Ok(u32::try_from(value).unwrap_or(u32::MAX))
    } else {
        Err(Error::invalid_params(format!(
            "`{field}` must be between {} and {}{unit}",
            range.start(),
            range.end()
        )))
    }
}

pub fn ram(value: i64) -> Result<u32> {
    ranged("ram", value, limits::RAM, " MiB")
}

pub fn cpu(value: i64) -> Result<u32> {
    ranged("cpu", value, limits::CPU, "")
}

pub fn disk_size(field: &str, value: i64) -> Result<u32> {
    ranged(field, value, limits::DISK_SIZE, " GiB")
}

pub fn vm_id(value: &str) -> Result<()> {
    let valid = !value.is_empty()
        && value.len() <= limits::VM_ID_MAX_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(Error::invalid_params(
            "`vm_id` must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
        ))
    }
}

pub fn password(value: &str) -> Result<()> {
    if limits::PASSWORD_LEN.contains(&value.chars().count()) {
        Ok(())
    } else {
        Err(Error::invalid_params(format!(
            "`password` must be {} to {} characters",
            limits::PASSWORD_LEN.start(),
            limits::PASSWORD_LEN.end()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        ram: i64,
        password: String,
        #[serde(default)]
        disks: Vec<Disk>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Disk {
        disk_size: i64,
    }

    fn message(value: Value) -> String {
        let Value::Object(data) = value else { panic!() };
        parse::<Sample>(data).unwrap_err().message.into_owned()
    }

    #[test]
    fn messages_name_the_field_and_never_the_value() {
        let cases = [
            (
                json!({"ram": "hunter22", "password": "x"}),
                "`ram` must be an integer, not a string",
            ),
            (
                json!({"ram": 1.5, "password": "x"}),
                "`ram` must be an integer, not a fraction",
            ),
            (json!({"password": "hunter22"}), "`ram` is required"),
            (
                json!({"ram": 1, "password": 5}),
                "`password` must be a string, not an integer",
            ),
            (
                json!({"ram": 1, "password": "x", "hunter22": 1}),
                "`hunter22` is not a known field",
            ),
            (
                json!({"ram": 1, "password": "x", "disks": [{"disk_size": "hunter22"}]}),
                "`disks[0].disk_size` must be an integer, not a string",
            ),
            (
                json!({"ram": 1, "password": "x", "disks": [{}]}),
                "`disks[0].disk_size` is required",
            ),
            (
                json!({"ram": 1, "password": "x", "disks": {"a": 1}}),
                "`disks` must be an array, not an object",
            ),
            (
                json!({"ram": 18446744073709551615u64, "password": "x"}),
                "`ram` is out of range",
            ),
        ];
        for (input, expected) in cases {
            let got = message(input);
            assert_eq!(got, expected);
            assert!(!got.contains("hunter22") || expected.contains("hunter22"));
        }
    }

    #[test]
    fn limits() {
        assert!(vm_id("stalin").is_ok());
        assert!(vm_id("a.b_c-D9").is_ok());
        assert!(vm_id("").is_err());
        assert!(vm_id("has space").is_err());
        assert!(vm_id("é").is_err());
        assert!(vm_id(&"x".repeat(64)).is_ok());
        assert!(vm_id(&"x".repeat(65)).is_err());
        assert_eq!(ram(512).unwrap(), 512);
        assert!(ram(0).is_err());
        assert!(ram(4_194_305).is_err());
        assert!(cpu(1025).is_err());
        assert!(disk_size("disk_size", -1).is_err());
        assert!(password("1234567").is_err());
        assert!(password("12345678").is_ok());
        assert!(password(&"p".repeat(129)).is_err());
    }
}
