//! What the property tests of the parsers of remote input share (each parser has its own
//! `#[cfg(test)] mod fuzz` beside it): the run configuration and generators of hostile input.
//!
//! Few cases by default so that CI stays fast; `PROPTEST_CASES=100000 cargo test --lib fuzz`
//! runs more. See docs/security.md, "Property-based fuzzing".

use proptest::{
    collection::{btree_map, vec},
    prelude::*,
    sample::Index,
    test_runner::Config,
};
use serde_json::Value;

/// `cases` runs, unless `PROPTEST_CASES` asks for another number. Failures are not written to
/// files next to the sources: a failure found is kept as a named regression test instead.
pub fn config(cases: u32) -> Config {
    let mut c = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c.failure_persistence = None;
    c
}

/// Strings a parser may meet: anything, the characters ids, tokens and headers are made of,
/// edge cases, and long runs.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<String>(),
        3 => "[a-zA-Z0-9:@!$#+._=,;\"' /\\\\-]{0,40}",
        1 => Just(String::new()),
        1 => prop::sample::select(vec![
            "\u{0}", "\u{ff}", "ÿ", "🎉", "\r\n", "\"", "\\", "=", ",", "..", ":", "-", "_",
            "[::1]", "1.2.3.4:65536", "a:99999999999999999999", "s18446744073709551616",
            "b-1", "s-1", "\u{202e}", "é\u{301}",
        ])
        .prop_map(str::to_owned),
        1 => (1usize..5000).prop_map(|n| "a".repeat(n)),
    ]
}

/// Numbers at the edges of what JSON and our integers hold.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // Non-finite floats become null (serde_json cannot hold them).
        any::<f64>().prop_map(Value::from),
        prop::sample::select(vec![
            Value::from(u64::MAX),
            Value::from(i64::MIN),
            Value::from(9_007_199_254_740_992_u64),
            Value::from(-9_007_199_254_740_993_i64),
            Value::from(1e300),
            Value::from(-0.0),
            Value::from(0.5),
        ]),
    ]
}

/// Any JSON value, nested a few levels.
pub fn json() -> impl Strategy<Value = Value> {
    nested(prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ])
}

/// JSON that is also canonical JSON (no floats, integers within +-(2^53 - 1)): what signed
/// objects may hold.
pub fn canonical_json() -> impl Strategy<Value = Value> {
    const MAX: i64 = (1 << 53) - 1;
    nested(prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop_oneof![-MAX..=MAX, Just(MAX), Just(-MAX)].prop_map(Value::from),
        text().prop_map(Value::String),
    ])
}

fn nested(leaf: impl Strategy<Value = Value> + 'static) -> impl Strategy<Value = Value> {
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(Value::Array),
            btree_map(key(), inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Object keys: mostly ones the parsers look for, sometimes anything.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "type", "content", "sender", "room_id", "event_id", "state_key", "depth", "hashes",
            "signatures", "unsigned", "auth_events", "prev_events", "origin_server_ts", "key",
            "keys", "kid", "alg", "kty", "issuer", "jwks_uri", "id_token", "error", "m.server",
            "sub", "exp", "server_name", "verify_keys", "valid_until_ts", "sha256",
        ])
        .prop_map(str::to_owned),
        1 => text(),
    ]
}

/// JSON nested deeper than any parser should follow, as text (what arrives on the wire).
pub fn deep_json() -> impl Strategy<Value = String> {
    (1usize..400, any::<bool>()).prop_map(|(depth, arrays)| {
        if arrays {
            format!("{}{}", "[".repeat(depth), "]".repeat(depth))
        } else {
            format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
        }
    })
}

/// Server names: valid ones, and ones that are almost valid.
pub fn server_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9-]{1,12}(\\.[a-z0-9-]{1,12}){0,3}(:[0-9]{1,6})?",
        1 => "[0-9]{1,4}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(:[0-9]{1,6})?",
        1 => "\\[[0-9a-f:.]{0,24}\\](:[0-9]{1,5})?",
        1 => text(),
    ]
}

/// Server names that are valid (DNS names, IPv4 and IPv6 literals, with or without a port).
pub fn valid_server_name() -> impl Strategy<Value = ruma::OwnedServerName> {
    prop_oneof![
        4 => "[a-z0-9-]{1,12}(\\.[a-z0-9-]{1,12}){0,3}(:[1-9][0-9]{0,3})?",
        1 => "((25[0-5]|1[0-9]{2}|[1-9]?[0-9])\\.){3}(25[0-5]|1[0-9]{2}|[1-9]?[0-9])(:[1-9][0-9]{0,3})?",
        1 => prop::sample::select(vec!["[::1]", "[2001:db8::1]:8448", "[fe80::1:2:3]"]).prop_map(str::to_owned),
    ]
    .prop_filter_map("a server name", |s| ruma::OwnedServerName::try_from(s).ok())
}

/// A few edits (insert, delete, replace a byte) to turn valid input into almost valid input.
pub type Edits = Vec<(Index, u8, u8)>;

pub fn edits() -> impl Strategy<Value = Edits> {
    vec((any::<Index>(), 0u8..3, any::<u8>()), 0..4)
}

pub fn apply_edits(mut bytes: Vec<u8>, edits: &Edits) -> Vec<u8> {
    for (at, op, byte) in edits {
        match op {
            0 => bytes.insert(at.index(bytes.len() + 1), *byte),
            1 if !bytes.is_empty() => {
                bytes.remove(at.index(bytes.len()));
            }
            _ if !bytes.is_empty() => {
                let i = at.index(bytes.len());
                bytes[i] = *byte;
            }
            _ => {}
        }
    }
    bytes
}

/// [`apply_edits`] on text (an edit that breaks UTF-8 becomes U+FFFD).
pub fn edit_text(text: &str, edits: &Edits) -> String {
    String::from_utf8_lossy(&apply_edits(text.as_bytes().to_vec(), edits)).into_owned()
}
