//! Server ACLs (`m.room.server_acl`): which servers may take part in a room. Every federation
//! endpoint that concerns a room asks [`Rooms::server_acl_allows`] (or
//! [`Rooms::ensure_server_acl`] for the 403) about the requesting server; incoming `/send` skips
//! PDUs and room EDUs of denied servers with the same check.
//!
//! The rules, in order, on the room's current ACL event:
//! 1. no `m.room.server_acl` in the room state: allowed;
//! 2. the server name is an IP literal and `allow_ip_literals` is `false`: denied;
//! 3. the name (without its port) matches a `deny` entry: denied;
//! 4. it matches an `allow` entry: allowed;
//! 5. otherwise denied (no `allow` list denies everybody).
//!
//! In entries `*` matches any run of characters (also none) and `?` exactly one. Host names are
//! compared case-insensitively, as DNS names are: `EVIL.example` cannot slip past a deny entry for
//! `evil.example`.

use ruma::{events::StateEventType, RoomId, ServerName};
use serde_json::Value;

use super::Rooms;
use crate::error::{Error, Result};

/// Entries of one list at most looked at; an ACL event is bounded by the event size anyway.
const MAX_ENTRIES: usize = 1000;

/// A parsed `m.room.server_acl` content, read leniently as the spec asks: a missing or
/// non-boolean `allow_ip_literals` is `true`, missing lists are empty, non-string entries are
/// ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAcl {
    pub allow_ip_literals: bool,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

impl ServerAcl {
    pub fn from_content(content: &Value) -> ServerAcl {
        let list = |key: &str| -> Vec<String> {
            content
                .get(key)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .take(MAX_ENTRIES)
                        .filter_map(Value::as_str)
                        .map(str::to_ascii_lowercase)
                        .collect()
                })
                .unwrap_or_default()
        };
        ServerAcl {
            allow_ip_literals: content
                .get("allow_ip_literals")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            allow: list("allow"),
            deny: list("deny"),
        }
    }

    /// Does the ACL let `server` in? The port is not part of what is matched.
    pub fn allows(&self, server: &ServerName) -> bool {
        if server.is_ip_literal() && !self.allow_ip_literals {
            return false;
        }
        let host = server.host().to_ascii_lowercase();
        if self.deny.iter().any(|p| acl_glob(p, &host)) {
            return false;
        }
        self.allow.iter().any(|p| acl_glob(p, &host))
    }
}

/// Does `text` match `pattern`, where `*` matches any run of characters (also none) and `?`
/// exactly one? Iterative with one backtrack point: time O(len(pattern) * len(text)) at worst,
/// no recursion, so a hostile pattern cannot blow the stack or run away.
pub fn acl_glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    // Where the last `*` was, and the text position it currently stands for up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            // Let the last `*` swallow one more character and try again from there.
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

impl Rooms {
    /// The room's current server ACL, if it has one.
    pub fn server_acl(&self, room_id: &RoomId) -> Result<Option<ServerAcl>> {
        Ok(self
            .state_content(room_id, &StateEventType::RoomServerAcl, "")?
            .map(|c| ServerAcl::from_content(&c)))
    }

    /// May `server` take part in the room by its current `m.room.server_acl`? No ACL event:
    /// yes. (An unknown room has no ACL, so this says yes; callers check the room exists.)
    pub fn server_acl_allows(&self, room_id: &RoomId, server: &ServerName) -> Result<bool> {
        Ok(self
            .server_acl(room_id)?
            .is_none_or(|acl| acl.allows(server)))
    }

    /// [`Rooms::server_acl_allows`] as the 403 `M_FORBIDDEN` the federation endpoints answer.
    pub fn ensure_server_acl(&self, room_id: &RoomId, server: &ServerName) -> Result<()> {
        if self.server_acl_allows(room_id, server)? {
            Ok(())
        } else {
            Err(Error::forbidden(format!(
                "{server} is denied by the room's server ACL"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn name(s: &str) -> &ServerName {
        <&ServerName>::try_from(s).expect("server name")
    }

    #[test]
    fn glob_star_and_question_mark() {
        assert!(acl_glob("*", ""));
        assert!(acl_glob("*", "anything.example"));
        assert!(acl_glob("example.org", "example.org"));
        assert!(!acl_glob("example.org", "example.org.evil"));
        assert!(!acl_glob("example.org", "xexample.org"));
        assert!(acl_glob("*.example.org", "chat.example.org"));
        assert!(acl_glob("*.example.org", "a.b.example.org"));
        assert!(!acl_glob("*.example.org", "example.org"));
        assert!(!acl_glob("*.example.org", "evilexample.org"));
        assert!(acl_glob("?.example.org", "a.example.org"));
        assert!(!acl_glob("?.example.org", "ab.example.org"));
        assert!(!acl_glob("?.example.org", ".example.org"));
        assert!(acl_glob("ex*le.*", "example.org"));
        assert!(acl_glob("ex*le.*", "exle."));
        assert!(acl_glob("*a*a*a*", "banana.a"));
        assert!(!acl_glob(
            "*a*a*a*b",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        ));
        assert!(acl_glob("**", "x"));
        assert!(acl_glob("?*", "x"));
        assert!(!acl_glob("?*", ""));
        assert!(acl_glob("a?c*", "abcdef"));
        assert!(!acl_glob("", "a"));
        assert!(acl_glob("", ""));
    }

    #[test]
    fn acl_rules_in_order() {
        let acl = ServerAcl::from_content(&json!({
            "allow": ["*"],
            "deny": ["evil.example", "*.evil.example"],
            "allow_ip_literals": false,
        }));
        assert!(acl.allows(name("good.example")));
        assert!(acl.allows(name("good.example:8448")));
        assert!(!acl.allows(name("evil.example")));
        // The port is not part of the match, and neither is the case.
        assert!(!acl.allows(name("evil.example:443")));
        assert!(!acl.allows(name("EVIL.example")));
        assert!(!acl.allows(name("a.evil.example")));
        assert!(!acl.allows(name("1.2.3.4")));
        assert!(!acl.allows(name("1.2.3.4:8448")));
        assert!(!acl.allows(name("[::1]:8448")));

        // Deny wins over allow; no allow list denies everybody.
        let acl =
            ServerAcl::from_content(&json!({ "allow": ["a.example"], "deny": ["a.example"] }));
        assert!(!acl.allows(name("a.example")));
        let acl = ServerAcl::from_content(&json!({ "deny": ["x.example"] }));
        assert!(!acl.allows(name("a.example")));

        // Defaults: IP literals allowed unless `false` exactly; junk entries ignored.
        let acl = ServerAcl::from_content(&json!({
            "allow": ["*", 5, null],
            "allow_ip_literals": "no",
        }));
        assert!(acl.allow_ip_literals);
        assert_eq!(acl.allow, vec!["*".to_owned()]);
        assert!(acl.allows(name("1.2.3.4")));
        assert!(acl.allows(name("[2001:db8::1]")));
        let acl = ServerAcl::from_content(&json!({ "allow": "*" }));
        assert!(!acl.allows(name("a.example")));

        // Patterns are matched against the host only: `?` stands for one character.
        let acl = ServerAcl::from_content(&json!({ "allow": ["matrix?.example"] }));
        assert!(acl.allows(name("matrix1.example:8448")));
        assert!(!acl.allows(name("matrix.example")));
    }
}
