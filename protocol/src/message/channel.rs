//! Channel names: `namespace:name` or a bare `name` in the default namespace.

use thiserror::Error;

/// A validated channel name, borrowed from the text it was parsed from.
///
/// Built by [`parse_channel`]. `full` is the whole name as sent (`room:42`); `namespace` is `Some("room")`
/// and `name` is `"42"`. A bare `lobby` has no namespace (the default namespace) and `name == full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Channel<'a> {
    /// The part before the `:`, or `None` for a name in the default namespace.
    pub namespace: Option<&'a str>,
    /// The part after the `:` (or the whole name when there is no namespace).
    pub name: &'a str,
    /// The whole channel name, `namespace:name` or `name`.
    pub full: &'a str,
}

/// Why a channel name was refused by [`parse_channel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ChannelError {
    /// The channel name is the empty string.
    #[error("channel name is empty")]
    Empty,
    /// The channel name is longer than the configured maximum (in bytes).
    #[error("channel name is {len} bytes long, the limit is {max}")]
    TooLong {
        /// Length of the refused name, in bytes.
        len: usize,
        /// The configured maximum length, in bytes.
        max: usize,
    },
    /// The channel name holds a character outside `[A-Za-z0-9_.@=/-]` (and the single `:`).
    #[error("channel name contains the forbidden character {0:?}")]
    BadChar(char),
    /// The channel name holds more than one `:` separator.
    #[error("channel name contains more than one ':'")]
    ExtraColon,
    /// The part before the `:` is empty (`:name`).
    #[error("channel namespace is empty")]
    EmptyNamespace,
    /// The part after the `:` is empty (`namespace:`).
    #[error("channel name after the namespace is empty")]
    EmptyName,
}

/// Bytes allowed in a namespace and in a name: ASCII `[A-Za-z0-9_.@=/-]`.
const ALLOWED: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = b'0';
    while c <= b'9' {
        t[c as usize] = true;
        c += 1;
    }
    c = b'a';
    while c <= b'z' {
        t[c as usize] = true;
        t[(c - b'a' + b'A') as usize] = true;
        c += 1;
    }
    t[b'_' as usize] = true;
    t[b'.' as usize] = true;
    t[b'@' as usize] = true;
    t[b'=' as usize] = true;
    t[b'/' as usize] = true;
    t[b'-' as usize] = true;
    t
};

/// Parses and validates a channel name.
///
/// Accepted: `namespace:name` or a bare `name` (default namespace); total length `1..=max_len` bytes;
/// namespace and name made of ASCII `[A-Za-z0-9_.@=/-]`, neither empty; at most one `:`.
///
/// # Errors
/// The first rule broken, as a [`ChannelError`]: length is checked first, then characters left to right.
pub fn parse_channel(s: &str, max_len: usize) -> Result<Channel<'_>, ChannelError> {
    let bytes = s.as_bytes();
    if bytes.is_empty() {
        return Err(ChannelError::Empty);
    }
    if bytes.len() > max_len {
        return Err(ChannelError::TooLong { len: bytes.len(), max: max_len });
    }
    let mut colon = None;
    for (i, &b) in bytes.iter().enumerate() {
        if ALLOWED[b as usize] {
            continue;
        }
        if b == b':' {
            if colon.is_some() {
                return Err(ChannelError::ExtraColon);
            }
            colon = Some(i);
            continue;
        }
        // `i` is a char boundary: every byte before it is ASCII.
        let c = s.get(i..).and_then(|t| t.chars().next()).unwrap_or('\u{fffd}');
        return Err(ChannelError::BadChar(c));
    }
    match colon {
        None => Ok(Channel { namespace: None, name: s, full: s }),
        Some(i) => {
            let (namespace, name) = (&s[..i], &s[i + 1..]);
            if namespace.is_empty() {
                return Err(ChannelError::EmptyNamespace);
            }
            if name.is_empty() {
                return Err(ChannelError::EmptyName);
            }
            Ok(Channel { namespace: Some(namespace), name, full: s })
        }
    }
}

/// The user a personal channel belongs to: for a channel in the `user` namespace (`user:alice`), its name
/// (`alice`); `None` for every other channel.
#[must_use]
pub fn personal_channel_owner<'a>(c: &Channel<'a>) -> Option<&'a str> {
    match c.namespace {
        Some("user") => Some(c.name),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_namespaced_and_bare() {
        let c = parse_channel("room:42", 128).unwrap();
        assert_eq!(c.namespace, Some("room"));
        assert_eq!(c.name, "42");
        assert_eq!(c.full, "room:42");
        let c = parse_channel("lobby", 128).unwrap();
        assert_eq!(c.namespace, None);
        assert_eq!(c.name, "lobby");
        assert_eq!(c.full, "lobby");
        let c = parse_channel("a-b_c.d@e=f/g:Z9", 128).unwrap();
        assert_eq!(c.namespace, Some("a-b_c.d@e=f/g"));
        assert_eq!(c.name, "Z9");
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(parse_channel("", 128), Err(ChannelError::Empty));
        assert_eq!(parse_channel("abcd", 3), Err(ChannelError::TooLong { len: 4, max: 3 }));
        assert!(parse_channel("abc", 3).is_ok());
        assert_eq!(parse_channel("a b", 128), Err(ChannelError::BadChar(' ')));
        assert_eq!(parse_channel("a:é", 128), Err(ChannelError::BadChar('é')));
        assert_eq!(parse_channel("a\"", 128), Err(ChannelError::BadChar('"')));
        assert_eq!(parse_channel("a:b:c", 128), Err(ChannelError::ExtraColon));
        assert_eq!(parse_channel(":b", 128), Err(ChannelError::EmptyNamespace));
        assert_eq!(parse_channel("a:", 128), Err(ChannelError::EmptyName));
        assert_eq!(parse_channel(":", 128), Err(ChannelError::EmptyNamespace));
        assert_eq!(parse_channel("a*", 128), Err(ChannelError::BadChar('*')));
    }

    #[test]
    fn personal_channels() {
        let c = parse_channel("user:alice", 128).unwrap();
        assert_eq!(personal_channel_owner(&c), Some("alice"));
        let c = parse_channel("users:alice", 128).unwrap();
        assert_eq!(personal_channel_owner(&c), None);
        let c = parse_channel("user", 128).unwrap();
        assert_eq!(personal_channel_owner(&c), None);
    }
}
