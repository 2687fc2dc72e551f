//! The audit log: an append-only record of what data-protection law wants traceable (logins,
//! devices, memberships, admin actions, policy denials, federation partners contacted). Entries
//! are keyed by time, so retention deletes a prefix and queries read a range; an index by user
//! serves queries about one person (and their pseudonymization on erasure).
//!
//! IP addresses are personal data: by default they are truncated before they are written
//! (`audit_ip_mode`), so the log proves where a connection came from without keeping more than
//! it needs.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    config::Config,
    error::Result,
    storage::{Batch, Storage, Table},
    utils,
};

/// How IP addresses are kept in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IpMode {
    /// As received.
    Keep,
    /// IPv4 to its /24, IPv6 to its /48 (the default).
    #[default]
    Truncate,
    /// A keyed hash (HMAC-SHA256 with a secret kept in the database): the same address gives
    /// the same value, the address itself is not kept.
    Hash,
    /// Not at all.
    Drop,
}

/// One audit entry.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry {
    /// When (ms since the epoch); set on recording.
    #[serde(default)]
    pub ts: u64,
    /// What happened: `login`, `login_failed`, `device_created`, `device_deleted`,
    /// `token_refreshed`, `connection`, `membership`, `admin_action`, `policy_denied`,
    /// `federation_contact`, ...
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// Anything else the kind needs (the policy that denied, the admin endpoint, the server).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub detail: Value,
}

/// The log. Writes go into the caller's batch where the audited change has one (so the change
/// and its record commit together), or into a batch of their own.
pub struct AuditLog {
    storage: Storage,
    ip_mode: IpMode,
    /// Orders entries of the same millisecond; restarts continue from the time, not from 0, so
    /// keys never collide (time moves on between runs).
    seq: AtomicU64,
}

/// Key of an entry: big-endian time and sequence number.
pub fn entry_key(ts: u64, seq: u64) -> Vec<u8> {
    let mut k = ts.to_be_bytes().to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl AuditLog {
    pub fn new(storage: Storage, config: &Config) -> AuditLog {
        AuditLog {
            storage,
            ip_mode: config.audit_ip_mode,
            seq: AtomicU64::new(0),
        }
    }

    /// An IP address as the configured mode keeps it.
    pub fn ip(&self, ip: Option<IpAddr>) -> Option<String> {
        let ip = ip?;
        match self.ip_mode {
            IpMode::Keep => Some(ip.to_string()),
            IpMode::Drop => None,
            IpMode::Truncate => Some(match ip {
                IpAddr::V4(v4) => {
                    let o = v4.octets();
                    format!("{}.{}.{}.0/24", o[0], o[1], o[2])
                }
                IpAddr::V6(v6) => {
                    let s = v6.segments();
                    format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
                }
            }),
            IpMode::Hash => Some(format!(
                "hmac:{}",
                utils::keyed_hash(&self.hash_key(), ip.to_string().as_bytes())
            )),
        }
    }

    /// The secret the `hash` mode keys with, made on first use and kept in the database.
    pub(crate) fn hash_key(&self) -> Vec<u8> {
        const ROW: &[u8] = b"audit_ip_key";
        if let Ok(Some(k)) = self.storage.get(Table::Global, ROW) {
            return k;
        }
        let k = utils::random_string(32).into_bytes();
        // A concurrent first use may write another key; the later write wins and both entries
        // stay valid hashes, only not comparable with each other (a one-time effect).
        let _ = self.storage.put(Table::Global, ROW, &k);
        k
    }

    /// Add an entry to `batch`.
    pub fn put(&self, batch: &mut Batch, mut entry: AuditEntry) -> Result<()> {
        if entry.ts == 0 {
            entry.ts = utils::now_ms();
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let key = entry_key(entry.ts, seq);
        if let Some(user) = &entry.user {
            let mut k = user.as_bytes().to_vec();
            k.push(0xff);
            k.extend_from_slice(&key);
            batch.put(Table::AuditByUser, &k, b"")?;
        }
        batch.put(Table::AuditLog, &key, &serde_json::to_vec(&entry)?)
    }

    /// Record an entry on its own.
    pub fn record(&self, entry: AuditEntry) -> Result<()> {
        let mut batch = self.storage.batch();
        self.put(&mut batch, entry)?;
        batch.commit()
    }

    /// Entries with `from <= ts < to`, oldest first, at most `limit`, that `keep` accepts; and
    /// the key to continue after, when more may follow.
    pub fn query(
        &self,
        from: u64,
        to: u64,
        limit: usize,
        after: Option<&[u8]>,
        mut keep: impl FnMut(&AuditEntry) -> bool,
    ) -> Result<(Vec<AuditEntry>, Option<Vec<u8>>)> {
        let start = match after {
            Some(k) => {
                let mut k = k.to_vec();
                k.push(0);
                k
            }
            None => entry_key(from, 0),
        };
        let mut out = Vec::new();
        for item in self
            .storage
            .scan_from(Table::AuditLog, b"", &start, false)?
        {
            let (k, v) = item?;
            if k.len() >= 8 && u64::from_be_bytes(k[..8].try_into().unwrap_or([0xff; 8])) >= to {
                return Ok((out, None));
            }
            let entry: AuditEntry = serde_json::from_slice(&v)?;
            if keep(&entry) {
                out.push(entry);
                if out.len() >= limit {
                    return Ok((out, Some(k.to_vec())));
                }
            }
        }
        Ok((out, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_modes() {
        let dir = tempfile::tempdir().expect("dir");
        let storage = Storage::open(dir.path(), 8, false).expect("storage");
        let mut config = Config::default();
        let v4: IpAddr = "192.0.2.77".parse().expect("ip");
        let v6: IpAddr = "2001:db8:1:2::5".parse().expect("ip");
        let log = AuditLog::new(storage.clone(), &config);
        assert_eq!(log.ip(Some(v4)).as_deref(), Some("192.0.2.0/24"));
        assert_eq!(log.ip(Some(v6)).as_deref(), Some("2001:db8:1::/48"));
        config.audit_ip_mode = IpMode::Hash;
        let log = AuditLog::new(storage.clone(), &config);
        let h = log.ip(Some(v4)).expect("hash");
        assert!(h.starts_with("hmac:") && !h.contains("192"));
        assert_eq!(log.ip(Some(v4)), Some(h));
        config.audit_ip_mode = IpMode::Drop;
        assert_eq!(AuditLog::new(storage, &config).ip(Some(v4)), None);
    }
}
