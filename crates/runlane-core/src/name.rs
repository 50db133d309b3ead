//! Validated names: envs, tasks, queues (lanes live in [`crate::lane`]).
//!
//! Names are cheap to clone (interned text, see [`crate::text`]) because every queued run
//! carries its env, task, queue and lane.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::error::InvalidInput;
use crate::text::NameText;

/// Checks `value` against a length bound and a character class; the error names `field`.
pub(crate) fn check(
    field: &'static str,
    value: &str,
    max_len: usize,
    allowed: fn(char) -> bool,
    class: &str,
) -> Result<(), InvalidInput> {
    if value.is_empty() {
        return Err(InvalidInput::new(field, "must not be empty"));
    }
    if value.len() > max_len {
        return Err(InvalidInput::new(
            field,
            format!("must be at most {max_len} bytes, got {}", value.len()),
        ));
    }
    if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
        return Err(InvalidInput::new(
            field,
            format!("character {bad:?} is not allowed (allowed: {class})"),
        ));
    }
    Ok(())
}

fn task_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/')
}

fn env_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr, $allowed:path, $class:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(NameText);

        impl $name {
            /// The longest accepted name, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates and wraps a name; the error names the field.
            pub fn new(value: &str) -> Result<Self, InvalidInput> {
                check($field, value, $max, $allowed, $class)?;
                Ok($name(NameText::new(value)))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidInput;
            fn from_str(s: &str) -> Result<Self, InvalidInput> {
                $name::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.0.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// An environment's name (a tenant scope): `[A-Za-z0-9_-]`, at most 64 bytes.
    EnvName, "env", 64, env_char, "A-Z a-z 0-9 _ -"
);
name_type!(
    /// A task's name: `[A-Za-z0-9_.:/-]`, at most 128 bytes.
    TaskName, "task", 128, task_char, "A-Z a-z 0-9 _ - . : /"
);
name_type!(
    /// A queue's name: `[A-Za-z0-9_.:/-]`, at most 128 bytes.
    QueueName, "queue", 128, task_char, "A-Z a-z 0-9 _ - . : /"
);

/// The longest accepted concurrency key, in bytes.
pub const CONCURRENCY_KEY_MAX_LEN: usize = 256;

/// Validates a concurrency key (any text up to 256 bytes; empty is the default key).
pub fn check_concurrency_key(key: &str) -> Result<(), InvalidInput> {
    if key.len() > CONCURRENCY_KEY_MAX_LEN {
        return Err(InvalidInput::new(
            "key",
            format!("must be at most {CONCURRENCY_KEY_MAX_LEN} bytes"),
        ));
    }
    check_no_nul("key", key)
}

/// A free-text identifier (a concurrency or idempotency key) holds no NUL character: the
/// stores' `text` columns refuse it and the Redis key space separates names with it.
pub fn check_no_nul(field: &'static str, text: &str) -> Result<(), InvalidInput> {
    if text.contains('\0') {
        return Err(InvalidInput::new(field, "must not contain a NUL character"));
    }
    Ok(())
}

/// A task's default queue has the task's name: both accept the same characters and length.
impl From<&TaskName> for QueueName {
    fn from(task: &TaskName) -> Self {
        QueueName(task.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in [
            "send-email",
            "emails.send",
            "a",
            "ns/task:v2",
            &"x".repeat(128),
        ] {
            assert!(TaskName::new(ok).is_ok(), "{ok}");
        }
        assert!(EnvName::new("prod_eu-1").is_ok());
    }

    #[test]
    fn refuses_bad_names_naming_the_field() {
        let cases: [(&str, &'static str); 4] = [
            ("", "must not be empty"),
            ("has space", "not allowed"),
            ("emoji🙂", "not allowed"),
            (&"x".repeat(129), "at most 128"),
        ];
        for (bad, why) in cases {
            let err = TaskName::new(bad).expect_err(bad);
            assert_eq!(err.field, "task");
            assert!(err.reason.contains(why), "{bad}: {}", err.reason);
        }
        assert_eq!(EnvName::new("a.b").expect_err("dot").field, "env");
        assert_eq!(QueueName::new("").expect_err("empty").field, "queue");
        assert!(check_concurrency_key(&"k".repeat(257)).is_err());
        assert!(check_concurrency_key("").is_ok());
    }
}
