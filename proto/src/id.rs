//! The one rule every id a client, an operator or a service names must follow: channels,
//! users, sessions, events, sync sessions, media nodes. 1 to [`MAX_LEN`] of `A-Z a-z 0-9 . _ -`,
//! so an id can sit inside a Redis hash tag, a pub/sub name, a certificate's URI and a log line
//! as it is.

/// Longest id, in bytes.
pub const MAX_LEN: usize = 64;

/// Whether `raw` is a valid id.
pub fn valid(raw: &str) -> bool {
    !raw.is_empty() && raw.len() <= MAX_LEN && raw.chars().all(valid_char)
}

/// Whether `c` may appear in an id.
pub fn valid_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_plain_and_tag_safe() {
        assert!(valid("ops-1.a_b"));
        assert!(valid(&"a".repeat(64)));
        for bad in ["", "a b", "{ops}", "a:b", "ü", &"a".repeat(65)] {
            assert!(!valid(bad), "{bad:?}");
        }
    }
}
