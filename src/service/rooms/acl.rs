//! Server ACLs (`m.room.server_acl`): which servers may take part in a room.

use ruma::{RoomId, ServerName};
use serde_json::Value;

use super::Rooms;
use crate::error::Result;

/// Most patterns read from one list of an ACL event.
const MAX_PATTERNS: usize = 1024;

impl Rooms {
    /// Whether the room's server ACL lets `server` take part. No ACL: every server may.
    pub fn server_acl_allows(&self, room_id: &RoomId, server: &ServerName) -> Result<bool> {
        let Some(acl) =
            self.state_content(room_id, &ruma::events::StateEventType::RoomServerAcl, "")?
        else {
            return Ok(true);
        };
        Ok(acl_allows(&acl, server))
    }
}

/// The ACL rules: the port is ignored; IP literals are refused unless `allow_ip_literals`
/// (default true); a deny match refuses; otherwise an allow match is needed.
pub fn acl_allows(acl: &Value, server: &ServerName) -> bool {
    let host = server.host();
    let allow_ip = acl
        .get("allow_ip_literals")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    if !allow_ip && server.is_ip_literal() {
        return false;
    }
    let patterns = |field: &str| -> Vec<String> {
        acl.get(field)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .take(MAX_PATTERNS)
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    if patterns("deny").iter().any(|p| glob_matches(p, host)) {
        return false;
    }
    patterns("allow").iter().any(|p| glob_matches(p, host))
}

/// `*` matches any run of characters, `?` one character; case-insensitive.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let t: Vec<char> = text.to_lowercase().chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_and_rules() {
        assert!(glob_matches("*", "example.org"));
        assert!(glob_matches("*.example.org", "a.example.org"));
        assert!(!glob_matches("*.example.org", "example.org"));
        assert!(glob_matches("ex?mple.org", "EXAMPLE.org"));
        let acl =
            serde_json::json!({"allow": ["*"], "deny": ["evil.org"], "allow_ip_literals": false});
        let name = |s: &str| ServerName::parse(s).expect("name");
        assert!(acl_allows(&acl, &name("good.org:8448")));
        assert!(!acl_allows(&acl, &name("evil.org:443")));
        assert!(!acl_allows(&acl, &name("127.0.0.1:8448")));
        assert!(!acl_allows(&serde_json::json!({}), &name("good.org")));
    }
}
