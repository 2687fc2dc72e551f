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

/// Does `name` match `pattern`, where `*` stands for any run of characters?
fn server_matches(pattern: &str, name: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    let name = name.to_ascii_lowercase();
    crate::service::filter::glob(&pattern, &name)
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
                && (f.allow.is_empty() || f.allow.iter().any(|p| server_matches(p, name)))
                && !f.deny.iter().any(|p| server_matches(p, name));
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
        let mut c = Config::default();
        c.allow_federation = enabled;
        c.federation_allowlist = allow.iter().map(|s| s.to_string()).collect();
        c.federation_denylist = deny.iter().map(|s| s.to_string()).collect();
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
}
