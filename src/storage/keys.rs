//! Key encoding helpers: parts joined with 0xff, counts as big-endian u64.

pub const SEP: u8 = 0xff;

/// Join string parts with the separator: `a 0xff b 0xff c`.
pub fn join(parts: &[&str]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(SEP);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

/// `join(parts)` followed by a separator: the prefix of every key below these parts.
pub fn prefix(parts: &[&str]) -> Vec<u8> {
    let mut k = join(parts);
    k.push(SEP);
    k
}

/// `prefix(parts)` followed by a big-endian count.
pub fn with_count(parts: &[&str], count: u64) -> Vec<u8> {
    let mut k = prefix(parts);
    k.extend_from_slice(&count.to_be_bytes());
    k
}

/// The big-endian count at the end of a key.
pub fn count_suffix(key: &[u8]) -> Option<u64> {
    let start = key.len().checked_sub(8)?;
    Some(u64::from_be_bytes(key[start..].try_into().ok()?))
}

/// A key `text 0xff count` (a room's log keys): the text and the count.
pub fn text_and_count(key: &[u8]) -> Option<(&str, u64)> {
    let sep = key.len().checked_sub(9)?;
    if key.get(sep) != Some(&SEP) {
        return None;
    }
    Some((std::str::from_utf8(&key[..sep]).ok()?, count_suffix(key)?))
}

/// The string after the last separator of a key.
pub fn last_part(key: &[u8]) -> Option<&str> {
    let pos = key.iter().rposition(|b| *b == SEP)?;
    std::str::from_utf8(&key[pos + 1..]).ok()
}

/// Split a key into its string parts.
pub fn split(key: &[u8]) -> Vec<&str> {
    key.split(|b| *b == SEP)
        .map(|p| std::str::from_utf8(p).unwrap_or(""))
        .collect()
}

pub fn u64_value(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}
