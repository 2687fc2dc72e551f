//! Minimum client versions (REQUIREMENTS.md C3: only patched operating systems and apps): the
//! version a user agent names for a token (`Element/1.5.2`, `Android 11`, `iOS 16.4`) compared
//! number by number with the configured minimum. `access::check_client` applies it.

use serde::{Deserialize, Serialize};

/// `{ token, version }` in `min_user_agent_versions`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MinVersion {
    pub token: String,
    pub version: String,
}

/// Most numbers a version is compared by (a bound on what a user agent can make us parse).
const MAX_PARTS: usize = 8;

/// `"1.6.10"` as `[1, 6, 10]`; None unless it is dot-separated numbers.
pub fn parse_version(v: &str) -> Option<Vec<u64>> {
    let parts: Vec<u64> = v
        .split(['.', '_'])
        .take(MAX_PARTS)
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    (!parts.is_empty()).then_some(parts)
}

/// `a < b`, missing parts counting as 0 (`12` equals `12.0`).
fn older(a: &[u64], b: &[u64]) -> bool {
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (
            a.get(i).copied().unwrap_or(0),
            b.get(i).copied().unwrap_or(0),
        );
        if x != y {
            return x < y;
        }
    }
    false
}

/// The version `agent` names for `token`: the token as a whole word (any case), then `/` or a
/// space, then digits and dots (`_` too: iOS writes `16_4` in browser user agents).
pub fn named_version(agent: &str, token: &str) -> Option<Vec<u64>> {
    let lower_agent = agent.to_ascii_lowercase();
    let lower_token = token.to_ascii_lowercase();
    let bytes = lower_agent.as_bytes();
    // An empty token would be found at the same place forever (the config refuses one; this
    // function does not rely on it).
    if lower_token.is_empty() {
        return None;
    }
    let mut from = 0;
    // Bounded by the agent's length: each round moves past one occurrence.
    while let Some(pos) = lower_agent.get(from..)?.find(&lower_token) {
        let start = from + pos;
        let end = start + lower_token.len();
        from = end;
        let word_start = start == 0 || !bytes[start - 1].is_ascii_alphanumeric();
        if !word_start || !matches!(bytes.get(end), Some(b'/') | Some(b' ')) {
            continue;
        }
        let rest = &agent[end + 1..];
        let digits: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '_')
            .take(64)
            .collect();
        let digits = digits.trim_end_matches(['.', '_']);
        if let Some(v) = parse_version(digits) {
            return Some(v);
        }
    }
    None
}

/// The first minimum `agent` falls below, as a sentence for the user.
pub fn too_old(minimums: &[MinVersion], agent: &str) -> Option<(String, String)> {
    for m in minimums {
        let (Some(found), Some(min)) = (named_version(agent, &m.token), parse_version(&m.version))
        else {
            continue;
        };
        if older(&found, &min) {
            let shown: Vec<String> = found.iter().map(u64::to_string).collect();
            return Some((
                m.token.clone(),
                format!(
                    "{} {} is older than {}, the oldest version this server accepts; please update",
                    m.token,
                    shown.join("."),
                    m.version
                ),
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn min(token: &str, version: &str) -> MinVersion {
        MinVersion {
            token: token.into(),
            version: version.into(),
        }
    }

    #[test]
    fn versions_named_in_user_agents() {
        let android = "Element/1.6.10 (Google Pixel 6; Android 13; TQ3A; Flavour GooglePlay; MatrixAndroidSdk2 1.6.10)";
        assert_eq!(named_version(android, "Element"), Some(vec![1, 6, 10]));
        assert_eq!(named_version(android, "android"), Some(vec![13]));
        let ios = "Mozilla/5.0 (iPhone; CPU iPhone OS 16_4 like Mac OS X) AppleWebKit/605.1.15";
        assert_eq!(named_version(ios, "iPhone OS"), Some(vec![16, 4]));
        assert_eq!(
            named_version("Element X/25.03.0 (iOS 17.1)", "iOS"),
            Some(vec![17, 1])
        );
        // Whole words only, and a version must follow.
        assert_eq!(named_version("NotElement/9.0", "Element"), None);
        assert_eq!(named_version("Element (beta)", "Element"), None);
        assert_eq!(named_version("", "Element"), None);
        // An empty token (the config refuses one) is found nowhere; it used to loop forever.
        assert_eq!(named_version("Element/1.2", ""), None);
    }

    #[test]
    fn minimums_compare_number_by_number() {
        let rules = [min("Android", "12"), min("Element", "1.6.0")];
        assert!(too_old(&rules, "Element/1.6.10 (Android 13)").is_none());
        assert!(too_old(&rules, "Element/1.10.0 (Android 12.1)").is_none());
        let (token, msg) = too_old(&rules, "Element/1.6.10 (Android 11)").expect("old");
        assert_eq!(token, "Android");
        assert!(msg.starts_with("Android 11 is older than 12"), "{msg}");
        assert_eq!(
            too_old(&rules, "Element/1.5.99 (Android 14)")
                .expect("old")
                .0,
            "Element"
        );
        assert!(too_old(&rules, "curl/8.0").is_none());
        assert!(parse_version("1.x").is_none());
        assert!(!older(&[12], &[12, 0]));
    }
}

/// Property tests: any user agent and configured token are read without panic, within the bound
/// on version parts, and a version written into an agent is read back.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, text};

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn fuzz_user_agents(
            agent in prop_oneof![text(), "[A-Za-z]{1,8}[/ ][0-9._]{0,20}( \\([^)]{0,20}\\))?"],
            token in prop_oneof![text(), "[A-Za-z]{1,8}"],
            version in prop::collection::vec(0u64..100_000, 1..=MAX_PARTS),
        ) {
            // An empty token looped forever here.
            if let Some(v) = named_version(&agent, &token) {
                prop_assert!(!v.is_empty() && v.len() <= MAX_PARTS);
            }
            if let Some(v) = parse_version(&agent) {
                prop_assert!(v.len() <= MAX_PARTS);
            }
            let written = version.iter().map(u64::to_string).collect::<Vec<_>>().join(".");
            prop_assert_eq!(parse_version(&written), Some(version.clone()));
            prop_assert_eq!(named_version(&format!("Mozilla/5.0 Element/{written} (x)"), "element"), Some(version));
        }
    }
}
