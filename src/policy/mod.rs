//! The policy layer: every decision the law makes goes through here, at fixed hook points:
//! the privacy-protective defaults the config sets, who the server federates with, closed user
//! groups and the external policy hook (`access`, `groups`, `hook`, and `claims`: the groups the
//! identity provider names), retention lifetimes
//! (`retention`), and the record and rights around personal data (`audit`, `register`,
//! `export`, `erasure`, `report`). Every denial is written to the audit log.

pub mod access;
pub mod audit;
pub mod claims;
pub mod client_version;
pub mod consent;
pub mod erasure;
pub mod export;
pub mod group_sweep;
pub mod groups;
pub mod hook;
pub mod register;
pub mod report;
pub mod retention;
pub mod transparency;

use ruma::UserId;

use crate::{
    config::Config,
    error::{Error, Result},
};

pub struct Policy {
    allow_presence: bool,
    allow_public_room_directory: bool,
    allow_public_rooms_over_federation: bool,
    federation: FederationPolicy,
    /// Room and message retention (D4): `retention.*` and rooms' `m.room.retention`.
    pub retention: retention::RetentionPolicy,
}

/// Who the server federates with: nobody unless federation is on; then everybody, or only the
/// allowlist's servers; never the denylist's.
#[derive(Clone)]
struct FederationPolicy {
    /// This server: never refused (its own signatures on events come back from others).
    own: ruma::OwnedServerName,
    enabled: bool,
    allow: Vec<String>,
    deny: Vec<String>,
}

/// A secret the policy layer keys hashes with (audit IP hashes, consent links): made on first
/// use and kept in the `global` row `row`. A concurrent first use may write another secret; the
/// later write wins and values keyed with the earlier one stop matching (a one-time effect).
pub(crate) fn stored_secret(storage: &crate::storage::Storage, row: &[u8]) -> Vec<u8> {
    use crate::storage::Table;
    if let Ok(Some(k)) = storage.get(Table::Global, row) {
        return k;
    }
    let k = crate::utils::random_string(32).into_bytes();
    let _ = storage.put(Table::Global, row, &k);
    k
}

/// Does the federation allow/deny list entry `pattern` name `server`? The one matcher of both
/// lists, used for every request in both directions (all of them ask
/// [`Policy::may_federate_with`]).
///
/// An entry is a host, optionally with a port: `evil.example`, `*.partner.example`,
/// `chat.partner.example:8448`, an IPv4 literal `192.0.2.7`, an IPv6 literal in brackets
/// `[2001:db8::1]` (as server names write it; without brackets too). `*` stands for any run of
/// characters in the host. Hosts compare case-insensitively, as DNS names do. An entry without a
/// port matches the host whatever the port (`evil.example` also names `evil.example:8448`, as a
/// server ACL does): a server name is a host plus an optional port, and the same organization
/// answers on every port of its host. An entry with a port matches only that port.
pub fn server_matches(pattern: &str, server: &ruma::ServerName) -> bool {
    let (host_pattern, port) = split_entry(pattern.trim());
    if host_pattern.is_empty() {
        return false;
    }
    if let Some(port) = port {
        if server.port() != Some(port) {
            return false;
        }
    }
    let host = server.host().to_ascii_lowercase();
    let host_pattern = host_pattern.to_ascii_lowercase();
    if crate::service::filter::glob(&host_pattern, &host) {
        return true;
    }
    // An IPv6 literal written without its brackets.
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(bare) if !host_pattern.starts_with('[') => {
            crate::service::filter::glob(&host_pattern, bare)
        }
        _ => false,
    }
}

/// An allow/deny entry as (host pattern, port): `[v6]:port`, `[v6]`, `host:port`, `host`; a bare
/// IPv6 literal (more than one `:`) has no port.
fn split_entry(entry: &str) -> (&str, Option<u16>) {
    if entry.starts_with('[') {
        return match entry.find(']') {
            Some(end) => {
                let (host, rest) = entry.split_at(end + 1);
                match rest.strip_prefix(':') {
                    Some(p) => match p.parse() {
                        Ok(port) => (host, Some(port)),
                        // Not a port: an entry that can match nothing.
                        Err(_) => ("", None),
                    },
                    None if rest.is_empty() => (host, None),
                    None => ("", None),
                }
            }
            None => ("", None),
        };
    }
    if entry.matches(':').count() == 1 {
        if let Some((host, p)) = entry.split_once(':') {
            return match p.parse() {
                Ok(port) => (host, Some(port)),
                Err(_) => ("", None),
            };
        }
    }
    (entry, None)
}

impl Policy {
    pub fn new(config: &Config) -> Policy {
        Policy {
            allow_presence: config.allow_presence,
            allow_public_room_directory: config.allow_public_room_directory,
            allow_public_rooms_over_federation: config.allow_public_rooms_over_federation,
            federation: FederationPolicy {
                own: config.server_name.clone(),
                enabled: config.allow_federation,
                allow: config.federation_allowlist.clone(),
                deny: config.federation_denylist.clone(),
            },
            retention: retention::RetentionPolicy::new(config),
        }
    }

    /// May other servers read this server's room directory? Off by default: which rooms an
    /// organization runs is its own business until the operator decides otherwise.
    pub fn may_serve_directory_over_federation(&self) -> Result<()> {
        if self.allow_public_rooms_over_federation {
            Ok(())
        } else {
            Err(Error::forbidden(
                "This server does not publish its room directory over federation",
            ))
        }
    }

    /// May this server exchange anything with `server` (requests in either direction)?
    pub fn may_federate_with(&self, server: &ruma::ServerName) -> Result<()> {
        let f = &self.federation;
        let name = server.as_str();
        let allowed = server == f.own
            || f.enabled
                && (f.allow.is_empty() || f.allow.iter().any(|p| server_matches(p, server)))
                && !f.deny.iter().any(|p| server_matches(p, server));
        if allowed {
            Ok(())
        } else {
            Err(Error::forbidden(format!(
                "Federation with {name} is not allowed by this server's policy"
            )))
        }
    }

    /// Presence is personal data: only shared when the operator turned it on.
    pub fn presence_enabled(&self) -> bool {
        self.allow_presence
    }

    /// May `user` publish a room in the directory?
    pub fn may_publish_room(&self, _user: &UserId) -> Result<()> {
        if self.allow_public_room_directory {
            Ok(())
        } else {
            Err(Error::forbidden(
                "Publishing rooms is disabled on this server",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(enabled: bool, allow: &[&str], deny: &[&str]) -> Policy {
        let c = Config {
            allow_federation: enabled,
            federation_allowlist: allow.iter().map(|s| s.to_string()).collect(),
            federation_denylist: deny.iter().map(|s| s.to_string()).collect(),
            ..Config::default()
        };
        Policy::new(&c)
    }

    fn ok(p: &Policy, name: &str) -> bool {
        p.may_federate_with(<&ruma::ServerName>::try_from(name).unwrap())
            .is_ok()
    }

    #[test]
    fn federation_allow_and_deny_lists() {
        assert!(!ok(&policy(false, &[], &[]), "a.example"));
        assert!(ok(&policy(true, &[], &[]), "a.example"));
        let partners = policy(
            true,
            &["*.partner.example", "b.example"],
            &["bad.partner.example"],
        );
        assert!(ok(&partners, "chat.partner.example"));
        assert!(ok(&partners, "B.example"));
        assert!(!ok(&partners, "bad.partner.example"));
        assert!(!ok(&partners, "c.example"));
        assert!(!ok(&partners, "partner.example.evil.org"));
        // The server itself is never refused, even when not listed.
        assert!(ok(&partners, "localhost"));
    }

    fn matches(pattern: &str, name: &str) -> bool {
        server_matches(pattern, <&ruma::ServerName>::try_from(name).unwrap())
    }

    #[test]
    fn list_entries_match_the_host_whatever_the_port() {
        // A host entry names the host on every port.
        assert!(matches("evil.example", "evil.example"));
        assert!(matches("evil.example", "evil.example:8448"));
        assert!(matches("evil.example", "EVIL.example:443"));
        assert!(matches("*.evil.example", "chat.evil.example:8448"));
        assert!(!matches("evil.example", "notevil.example:8448"));
        assert!(!matches("evil.example", "evil.example.org:8448"));
        // An entry with a port names that port only.
        assert!(matches("evil.example:8448", "evil.example:8448"));
        assert!(!matches("evil.example:8448", "evil.example"));
        assert!(!matches("evil.example:8448", "evil.example:8449"));
        assert!(matches("*:8448", "anyone.example:8448"));
        // IP literals: v4 with and without port, v6 in brackets or without them.
        assert!(matches("192.0.2.7", "192.0.2.7:8448"));
        assert!(matches("192.0.2.7:8448", "192.0.2.7:8448"));
        assert!(!matches("192.0.2.7:8448", "192.0.2.7"));
        assert!(matches("192.0.2.*", "192.0.2.99"));
        assert!(matches("[2001:db8::1]", "[2001:db8::1]:8448"));
        assert!(matches("[2001:DB8::1]:8448", "[2001:db8::1]:8448"));
        assert!(!matches("[2001:db8::1]:8448", "[2001:db8::1]:1"));
        assert!(matches("2001:db8::1", "[2001:db8::1]"));
        assert!(!matches("2001:db8::1", "[2001:db8::2]"));
        // Nonsense entries name nobody.
        assert!(!matches("", "a.example"));
        assert!(!matches("a.example:port", "a.example"));
        assert!(!matches("[2001:db8::1", "[2001:db8::1]"));
        assert!(!matches("[2001:db8::1]x", "[2001:db8::1]"));

        // Both lists use it: a denied host stays denied on any port, also when allowlisted.
        let p = policy(true, &["*.example"], &["evil.example"]);
        assert!(!ok(&p, "evil.example:8448"));
        assert!(!ok(&p, "evil.example:1"));
        assert!(ok(&p, "good.example:8448"));
        let p = policy(true, &["partner.example:8448"], &[]);
        assert!(ok(&p, "partner.example:8448"));
        assert!(!ok(&p, "partner.example:9000"));
        assert!(!ok(&p, "partner.example"));
    }
}
