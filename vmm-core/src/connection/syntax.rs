//! An incremental JSON syntax checker for one object or array.
//!
//! Counting brackets finds where a value ends only if it ends: a client that
//! sends `{"command":"ping"` and then a newline and good requests would have
//! them all swallowed into the open value. Knowing what may come next lets
//! [`super::FrameDecoder`] see, at the first byte that cannot continue the
//! value, that it is broken, and where the next request starts.
//!
//! A pushdown automaton over bytes: each byte is looked at once; the stack
//! holds one bit per open container, so it is bounded by the value's length.
//! UTF-8 and serde_json's own limits (nesting, number range) are left to
//! serde_json, which parses the value once it is complete.

/// What a byte did to the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// It belongs to the value, and more is needed.
    More,
    /// It closed the value.
    Done,
    /// It cannot continue the value.
    Error,
}

/// Where in a number the checker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Number {
    /// After `-`: a digit must follow.
    Minus,
    /// A leading `0`: no digit may follow.
    Zero,
    Int,
    /// After `.`: a digit must follow.
    Dot,
    Fraction,
    /// After `e` or `E`: a sign or a digit must follow.
    Exponent,
    /// After the exponent's sign: a digit must follow.
    ExponentSign,
    ExponentDigits,
}

impl Number {
    /// Whether the number may end here.
    fn is_complete(self) -> bool {
        matches!(
            self,
            Number::Zero | Number::Int | Number::Fraction | Number::ExponentDigits
        )
    }

    /// The state after `byte`, or `None` when `byte` is not part of the number.
    fn next(self, byte: u8) -> Option<Number> {
        use Number::*;
        Some(match (self, byte) {
            (Minus, b'0') => Zero,
            (Minus, b'1'..=b'9') | (Int, b'0'..=b'9') => Int,
            (Zero | Int, b'.') => Dot,
            (Dot | Fraction, b'0'..=b'9') => Fraction,
            (Zero | Int | Fraction, b'e' | b'E') => Exponent,
            (Exponent, b'+' | b'-') => ExponentSign,
            (Exponent | ExponentSign | ExponentDigits, b'0'..=b'9') => ExponentDigits,
            _ => return None,
        })
    }
}

/// Where in a string the checker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    /// After a backslash.
    Backslash,
    /// Inside `\uXXXX`, with this many hex digits still to come.
    Hex(u8),
}

/// What the checker expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A value: after `:`, or after `,` in an array.
    Value,
    /// A value or `]`: right after `[`.
    ValueOrClose,
    /// A key or `}`: right after `{`.
    KeyOrClose,
    /// A key: after `,` in an object.
    Key,
    /// The `:` after a key.
    Colon,
    /// `,` or the innermost container's closing bracket.
    CommaOrClose,
    /// Inside a string; `key` when it is an object's key.
    Str {
        key: bool,
        escape: Escape,
    },
    Number(Number),
    /// Inside `true`, `false` or `null`: the bytes still to come.
    Literal(&'static [u8]),
}

fn is_whitespace(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

/// One bit per open container, set for an object. Grows to the deepest
/// nesting seen (one byte of storage per eight bytes of input at most) and
/// keeps its storage for the next value.
#[derive(Debug, Clone, Default)]
struct Containers {
    words: Vec<u64>,
    depth: usize,
}

impl Containers {
    fn push(&mut self, object: bool) {
        let (word, bit) = (self.depth / 64, self.depth % 64);
        if word == self.words.len() {
            self.words.push(0);
        }
        if object {
            self.words[word] |= 1 << bit;
        } else {
            self.words[word] &= !(1 << bit);
        }
        self.depth += 1;
    }

    /// Whether the innermost container is an object (`None`: none is open).
    fn innermost_is_object(&self) -> Option<bool> {
        let top = self.depth.checked_sub(1)?;
        Some(self.words[top / 64] & (1 << (top % 64)) != 0)
    }
}

/// The checker for one object or array, from its opening bracket on.
#[derive(Debug, Clone)]
pub(super) struct Syntax {
    expect: Expect,
    containers: Containers,
}

impl Default for Syntax {
    fn default() -> Syntax {
        Syntax {
            expect: Expect::Value,
            containers: Containers::default(),
        }
    }
}

impl Syntax {
    /// Starts a new value (keeping the stack's storage).
    pub(super) fn reset(&mut self) {
        self.expect = Expect::Value;
        self.containers.depth = 0;
    }

    /// Takes the value's next byte.
    pub(super) fn step(&mut self, byte: u8) -> Step {
        match self.expect {
            Expect::Str { key, escape } => self.string(key, escape, byte),
            Expect::Literal(rest) => match rest.split_first() {
                Some((&want, rest)) if byte == want => {
                    self.expect = if rest.is_empty() {
                        Expect::CommaOrClose
                    } else {
                        Expect::Literal(rest)
                    };
                    Step::More
                }
                _ => Step::Error,
            },
            Expect::Number(number) => match number.next(byte) {
                Some(next) => {
                    self.expect = Expect::Number(next);
                    Step::More
                }
                // The byte after a number is not part of it: it goes on as
                // what follows the number.
                None if number.is_complete() => {
                    self.expect = Expect::CommaOrClose;
                    self.step(byte)
                }
                None => Step::Error,
            },
            _ if is_whitespace(byte) => Step::More,
            Expect::Value => self.value(byte),
            Expect::ValueOrClose if byte == b']' => self.close(byte),
            Expect::ValueOrClose => self.value(byte),
            Expect::KeyOrClose if byte == b'}' => self.close(byte),
            Expect::KeyOrClose | Expect::Key if byte == b'"' => {
                self.expect = Expect::Str {
                    key: true,
                    escape: Escape::None,
                };
                Step::More
            }
            Expect::Colon if byte == b':' => {
                self.expect = Expect::Value;
                Step::More
            }
            Expect::CommaOrClose if byte == b',' => {
                self.expect = match self.containers.innermost_is_object() {
                    Some(true) => Expect::Key,
                    _ => Expect::Value,
                };
                Step::More
            }
            Expect::CommaOrClose if matches!(byte, b'}' | b']') => self.close(byte),
            Expect::KeyOrClose | Expect::Key | Expect::Colon | Expect::CommaOrClose => Step::Error,
        }
    }

    /// The first byte of a value.
    fn value(&mut self, byte: u8) -> Step {
        self.expect = match byte {
            b'{' => {
                self.containers.push(true);
                Expect::KeyOrClose
            }
            b'[' => {
                self.containers.push(false);
                Expect::ValueOrClose
            }
            b'"' => Expect::Str {
                key: false,
                escape: Escape::None,
            },
            b'-' => Expect::Number(Number::Minus),
            b'0' => Expect::Number(Number::Zero),
            b'1'..=b'9' => Expect::Number(Number::Int),
            b't' => Expect::Literal(b"rue"),
            b'f' => Expect::Literal(b"alse"),
            b'n' => Expect::Literal(b"ull"),
            _ => return Step::Error,
        };
        Step::More
    }

    /// A closing bracket, which must match the innermost container.
    fn close(&mut self, byte: u8) -> Step {
        let Some(object) = self.containers.innermost_is_object() else {
            return Step::Error;
        };
        if object != (byte == b'}') {
            return Step::Error;
        }
        self.containers.depth -= 1;
        self.expect = Expect::CommaOrClose;
        if self.containers.depth == 0 {
            Step::Done
        } else {
            Step::More
        }
    }

    fn string(&mut self, key: bool, escape: Escape, byte: u8) -> Step {
        // Control characters, a raw newline among them, must be escaped.
        if byte < 0x20 {
            return Step::Error;
        }
        let escape = match (escape, byte) {
            (Escape::None, b'"') => {
                self.expect = if key {
                    Expect::Colon
                } else {
                    Expect::CommaOrClose
                };
                return Step::More;
            }
            (Escape::None, b'\\') => Escape::Backslash,
            (Escape::None, _) => Escape::None,
            (Escape::Backslash, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                Escape::None
            }
            (Escape::Backslash, b'u') => Escape::Hex(4),
            (Escape::Hex(left), _) if byte.is_ascii_hexdigit() => match left {
                1 => Escape::None,
                _ => Escape::Hex(left - 1),
            },
            (Escape::Backslash | Escape::Hex(_), _) => return Step::Error,
        };
        self.expect = Expect::Str { key, escape };
        Step::More
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checker's verdict on `text`, whose first byte is `{` or `[`:
    /// `Ok(n)` when the value is complete after `n` bytes, `Err(at)` at the
    /// first byte that cannot continue it, `Ok(0)` when it is incomplete.
    fn check(text: &str) -> Result<usize, usize> {
        let mut syntax = Syntax::default();
        for (at, &byte) in text.as_bytes().iter().enumerate() {
            match syntax.step(byte) {
                Step::More => {}
                Step::Done => return Ok(at + 1),
                Step::Error => return Err(at),
            }
        }
        Ok(0)
    }

    #[test]
    fn valid_values_end_at_their_closing_bracket() {
        // Deeper than one word of the container stack.
        let deep = format!("{}0{}", "[{\"a\":".repeat(70), "}]".repeat(70));
        for text in [
            deep.as_str(),
            "{}",
            "[]",
            r#"{"a":1}"#,
            r#"[1,-0.5e+3,0,10E2,true,false,null,"x",{},[]]"#,
            "{ \"a\" :\n [ 1 , { \"b\" : \"\\\"}\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\uD83D\" } ] \r\n}",
            r#"{"é€😀":"\u007f"}"#,
            "[[{\"a\":[{}]}],{\"b\":[[]]}]",
        ] {
            assert_eq!(check(text), Ok(text.len()), "{text}");
            assert_eq!(check(&format!("{text} trailing")), Ok(text.len()), "{text}");
        }
    }

    #[test]
    fn a_prefix_of_a_valid_value_is_incomplete() {
        let text = r#"{"a": [1, -2.5e-3, true, "x\"\u00e9", {"b": null}], "c": {}}"#;
        for end in 1..text.len() {
            assert_eq!(check(&text[..end]), Ok(0), "{}", &text[..end]);
        }
    }

    #[test]
    fn the_first_byte_that_cannot_continue_is_reported() {
        for (text, at) in [
            ("{1}", 1),
            ("{\"a\" 1}", 5),
            ("{\"a\":}", 5),
            ("{\"a\":1,}", 7),
            ("[1,]", 3),
            ("[1 2]", 3),
            ("[1}", 2),
            ("{\"a\":1]", 6),
            ("[01]", 2),
            ("[-]", 2),
            ("[1.]", 3),
            ("[1.e5]", 3),
            ("[1e]", 3),
            ("[1e+]", 4),
            ("[.5]", 1),
            ("[+1]", 1),
            ("[tru]", 4),
            ("[nul1]", 4),
            ("[truex]", 5),
            ("[\"a\nb\"]", 3),
            ("[\"a\tb\"]", 3),
            ("[\"\\x\"]", 3),
            ("[\"\\u12g4\"]", 6),
            ("{\"a\"\n:1,\n\"b\"\n}", 13),
            ("[\u{e9}]", 1),
        ] {
            assert_eq!(check(text), Err(at), "{text:?}");
        }
    }
}
