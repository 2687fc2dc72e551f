//! Event filters: which events a filter's `types`, `senders` and `contains_url` rules let
//! through. One implementation for `/sync`, `/messages` and `/context`.

use ruma::{
    api::client::filter::{RoomEventFilter, UrlFilter},
    OwnedUserId, UserId,
};
use serde_json::Value;

use crate::service::rooms::Pdu;

/// Does `pattern` (with `*` wildcards, as filters allow) match `text`?
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(pos) => rest = &rest[pos + part.len()..],
                None => return false,
            }
        }
    }
    true
}

/// The `types` / `not_types` rules: `not_types` wins; no `types` lets every type through.
pub fn type_matches(types: &Option<Vec<String>>, not_types: &[String], kind: &str) -> bool {
    if not_types.iter().any(|t| glob(t, kind)) {
        return false;
    }
    match types {
        Some(types) => types.iter().any(|t| glob(t, kind)),
        None => true,
    }
}

/// The `senders` / `not_senders` rules.
pub fn sender_matches(
    senders: &Option<Vec<OwnedUserId>>,
    not_senders: &[OwnedUserId],
    sender: &UserId,
) -> bool {
    if not_senders.iter().any(|s| s == sender) {
        return false;
    }
    match senders {
        Some(senders) => senders.iter().any(|s| s == sender),
        None => true,
    }
}

/// The type and (where there is one) sender rules of a room event filter.
pub fn room_event_matches(f: &RoomEventFilter, kind: &str, sender: Option<&UserId>) -> bool {
    type_matches(&f.types, &f.not_types, kind)
        && sender.is_none_or(|s| sender_matches(&f.senders, &f.not_senders, s))
}

/// Type, sender and `contains_url` rules, for an event of the room's history.
pub fn pdu_matches(f: &RoomEventFilter, pdu: &Pdu) -> bool {
    if !room_event_matches(f, &pdu.kind.to_string(), Some(&pdu.sender)) {
        return false;
    }
    let Some(url) = &f.url_filter else {
        return true;
    };
    let has_url = pdu.content_value().get("url").is_some_and(Value::is_string);
    match url {
        UrlFilter::EventsWithUrl => has_url,
        UrlFilter::EventsWithoutUrl => !has_url,
    }
}

/// Does the filter ask for lazy-loaded members?
pub fn lazy_loading(f: &RoomEventFilter) -> bool {
    !f.lazy_load_options.is_disabled()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns() {
        assert!(glob("m.room.*", "m.room.message"));
        assert!(glob("*", "anything"));
        assert!(glob("*", "x"));
        assert!(!glob("m.room.*", "m.typing"));
        assert!(!glob("m.room.*", "m.call.invite"));
        assert!(glob("m.*.message", "m.room.message"));
        assert!(glob("m.typing", "m.typing"));
        assert!(glob("m.room.message", "m.room.message"));
        assert!(!glob("m.room", "m.room.message"));
    }
}

/// Property tests: the wildcard patterns of a client's filter match exactly what the same
/// pattern as an anchored regex matches.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, text};

    fn reference(pattern: &str, text: &str) -> bool {
        let parts: Vec<String> = pattern.split('*').map(regex::escape).collect();
        regex::Regex::new(&format!("(?s)^{}$", parts.join(".*")))
            .expect("a regex")
            .is_match(text)
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn fuzz_glob_patterns(
            pattern in prop_oneof![text(), "[ab*.]{0,8}"],
            text in prop_oneof![text(), "[ab.]{0,10}"],
        ) {
            if pattern.len() <= 200 {
                prop_assert_eq!(glob(&pattern, &text), reference(&pattern, &text), "{:?} {:?}", pattern, text);
            }
        }
    }
}
