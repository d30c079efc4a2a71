//! Parsers for argument values, shared by the command line (clap's value
//! parsers in `main` and `agent`) and the shell's own arguments: seconds with
//! fractions, and a disk resize `ID=SIZE`. Out of `main`, so that the modules
//! `main` calls do not depend on it.

use std::time::Duration;

/// `--disk ID=SIZE` of `update`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resize {
    pub id: i64,
    pub size: u32,
}

/// Parses `ID=SIZE`, e.g. `1=150`.
pub fn parse_resize(text: &str) -> Result<Resize, String> {
    let wrong = || format!("`{text}` is not ID=SIZE (e.g. 1=150)");
    let (id, size) = text.split_once('=').ok_or_else(wrong)?;
    let id = id.trim().parse().map_err(|_| wrong())?;
    let size = size.trim().parse().map_err(|_| wrong())?;
    Ok(Resize { id, size })
}

/// Parses a number of seconds, fractions allowed (`0.3`, `15`).
pub fn parse_secs(text: &str) -> Result<Duration, String> {
    let wrong = |why: &str| format!("`{text}` is not a number of seconds: {why}");
    let secs: f64 = text.trim().parse().map_err(|_| wrong("not a number"))?;
    if secs.is_sign_negative() {
        return Err(wrong("negative"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| wrong("out of range"))
}

/// `Some(duration)`, or `None` for zero (off).
pub fn unless_zero(duration: Duration) -> Option<Duration> {
    (!duration.is_zero()).then_some(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_may_be_fractional() {
        assert_eq!(parse_secs("0.3"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_secs("20"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_secs("0"), Ok(Duration::ZERO));
        for wrong in ["-1", "abc", "", "NaN", "inf", "1e30"] {
            assert!(parse_secs(wrong).is_err(), "{wrong}");
        }
        assert_eq!(unless_zero(Duration::ZERO), None);
    }

    #[test]
    fn resize_takes_id_equals_size() {
        assert_eq!(parse_resize("1=150"), Ok(Resize { id: 1, size: 150 }));
        assert!(parse_resize("1=abc").is_err());
        assert!(parse_resize("150").is_err());
        assert!(parse_resize("=5").is_err());
    }
}
