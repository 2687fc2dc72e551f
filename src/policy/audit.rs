//! The audit log: an append-only record of what data-protection law wants traceable (logins,
//! devices, memberships, admin actions, policy denials, federation partners contacted). Entries
//! are keyed by time, so retention deletes a prefix and queries read a range; an index by user
//! serves queries about one person (and their pseudonymization on erasure).
//!
//! IP addresses are personal data: by default they are truncated before they are written
//! (`audit_ip_mode`), so the log proves where a connection came from without keeping more than
//! it needs.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use parking_lot::Mutex;
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
    /// The devices' client connections, in memory (see [`Connections`]).
    pub connections: Connections,
    /// Days entries are kept (0: forever).
    retention_days: u64,
}

/// Longest user agent kept (longer ones are cut at a character boundary).
pub const MAX_USER_AGENT: usize = 512;

/// Where the request being handled comes from: set by the router for every request (a tokio
/// task-local, so it exists per request, not per process), read where an audit entry is made
/// deep in a service without the HTTP request at hand.
#[derive(Clone, Debug, Default)]
pub struct RequestCtx {
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
}

tokio::task_local! {
    static REQUEST: RequestCtx;
}

impl RequestCtx {
    /// The client's address and user agent of an HTTP request.
    pub fn from_parts(headers: &http::HeaderMap, ip: Option<IpAddr>) -> RequestCtx {
        RequestCtx {
            ip,
            user_agent: headers
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(|ua| cut_user_agent(ua).to_owned()),
        }
    }

    /// Run `f` with this context as the current request's.
    pub async fn scope<F: std::future::Future>(self, f: F) -> F::Output {
        REQUEST.scope(self, f).await
    }

    /// The context of the request being handled (empty outside of one: background tasks,
    /// the CLI).
    pub fn current() -> RequestCtx {
        REQUEST.try_with(Clone::clone).unwrap_or_default()
    }
}

/// The user agent as kept: at most [`MAX_USER_AGENT`] bytes (cut at a character boundary).
fn cut_user_agent(ua: &str) -> &str {
    if ua.len() <= MAX_USER_AGENT {
        return ua;
    }
    let mut end = MAX_USER_AGENT;
    while !ua.is_char_boundary(end) {
        end -= 1;
    }
    &ua[..end]
}

/// Most devices whose connection is remembered; beyond, the stale ones are forgotten first.
const MAX_CONNECTIONS: usize = 100_000;

/// A device's last connection as remembered in memory.
#[derive(Clone, Debug)]
pub struct Seen {
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    /// Last request (ms).
    pub last_seen: u64,
    /// When a `connection` entry was last written for it (ms).
    written: u64,
}

/// Client connections per device without a write per request: the last address, user agent
/// and time of every device are kept in memory; a `connection` entry (and the device record's
/// last-seen fields) is written only when the address or user agent changes, or when the last
/// write is older than `audit_connection_interval_secs`.
pub struct Connections {
    map: Mutex<HashMap<String, Seen>>,
    interval_ms: u64,
}

fn conn_key(user: &str, device: &str) -> String {
    let mut k = String::with_capacity(user.len() + device.len() + 1);
    k.push_str(user);
    k.push('\n');
    k.push_str(device);
    k
}

impl Connections {
    pub fn new(interval_secs: u64) -> Connections {
        Connections {
            map: Mutex::new(HashMap::new()),
            interval_ms: interval_secs.saturating_mul(1000),
        }
    }

    /// Note a request of `user`'s `device`. Returns what to write when a write is due.
    pub fn seen(
        &self,
        user: &str,
        device: &str,
        ip: Option<IpAddr>,
        user_agent: Option<&str>,
    ) -> Option<Seen> {
        let now = utils::now_ms();
        let key = conn_key(user, device);
        // Compared as stored: a user agent longer than the stored cut is not a change on every
        // request.
        let cut = user_agent.map(cut_user_agent);
        let mut map = self.map.lock();
        if let Some(s) = map.get_mut(&key) {
            s.last_seen = now;
            let changed = s.ip != ip || s.user_agent.as_deref() != cut;
            if !changed && now.saturating_sub(s.written) < self.interval_ms {
                return None;
            }
            s.ip = ip;
            s.user_agent = cut.map(str::to_owned);
            s.written = now;
            return Some(s.clone());
        }
        if map.len() >= MAX_CONNECTIONS {
            let interval = self.interval_ms;
            map.retain(|_, s| now.saturating_sub(s.last_seen) < interval);
            if map.len() >= MAX_CONNECTIONS {
                map.clear();
            }
        }
        let s = Seen {
            ip,
            user_agent: cut.map(str::to_owned),
            last_seen: now,
            written: now,
        };
        map.insert(key, s.clone());
        Some(s)
    }

    /// The device's last connection, if it made one since the start.
    pub fn last(&self, user: &str, device: &str) -> Option<Seen> {
        self.map.lock().get(&conn_key(user, device)).cloned()
    }

    /// Forget a device (deleted).
    pub fn forget(&self, user: &str, device: &str) {
        self.map.lock().remove(&conn_key(user, device));
    }
}

/// What an audit query selects.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub user: Option<String>,
    pub device: Option<String>,
    pub room: Option<String>,
    pub kind: Option<String>,
    /// `from <= ts < to` (ms).
    pub from: u64,
    pub to: u64,
}

impl Filter {
    fn keeps(&self, e: &AuditEntry) -> bool {
        fn eq(want: &Option<String>, have: &Option<String>) -> bool {
            want.is_none() || want == have
        }
        e.ts >= self.from
            && e.ts < self.to
            && eq(&self.user, &e.user)
            && eq(&self.device, &e.device)
            && eq(&self.room, &e.room)
            && self.kind.as_ref().is_none_or(|k| *k == e.kind)
    }
}

/// Rows deleted per batch by the retention job.
const PURGE_CHUNK: usize = 1000;

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
            connections: Connections::new(config.audit_connection_interval_secs),
            retention_days: config.audit_retention_days,
        }
    }

    /// An entry of `kind` about `user`'s `device`, with the current request's address (as
    /// `audit_ip_mode` keeps it) and user agent.
    pub fn entry(&self, kind: &str, user: Option<&str>, device: Option<&str>) -> AuditEntry {
        let ctx = RequestCtx::current();
        AuditEntry {
            ts: 0,
            kind: kind.to_owned(),
            user: user.map(str::to_owned),
            device: device.map(str::to_owned),
            ip: self.ip(ctx.ip),
            user_agent: ctx.user_agent,
            room: None,
            detail: Value::Null,
        }
    }

    /// Record an entry after the fact (the audited change is already done): a failure is
    /// logged, not returned, so the client does not see an error for a change that happened.
    pub fn note(&self, entry: AuditEntry) {
        if let Err(e) = self.record(entry) {
            tracing::error!(error = %e, "could not write an audit entry");
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
        super::stored_secret(&self.storage, b"audit_ip_key")
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

impl AuditLog {
    /// Entries `filter` selects, oldest first, at most `limit`, continuing after the entry key
    /// `after` (a previous page's last key). Reads at most `max_scan` rows: the returned key,
    /// when some, is where to continue (more may follow).
    pub fn search(
        &self,
        filter: &Filter,
        after: Option<&[u8]>,
        limit: usize,
        max_scan: usize,
    ) -> Result<(Vec<AuditEntry>, Option<Vec<u8>>)> {
        let mut out = Vec::new();
        let mut scanned = 0usize;
        match &filter.user {
            // One person: walk their index rows, read the entries.
            Some(user) => {
                let mut prefix = user.as_bytes().to_vec();
                prefix.push(0xff);
                let mut start = prefix.clone();
                match after {
                    Some(k) => {
                        start.extend_from_slice(k);
                        start.push(0);
                    }
                    None => start.extend_from_slice(&entry_key(filter.from, 0)),
                }
                for item in self
                    .storage
                    .scan_from(Table::AuditByUser, &prefix, &start, false)?
                {
                    let (k, _) = item?;
                    let key = k[prefix.len()..].to_vec();
                    if key.len() < 8 || entry_ts(&key) >= filter.to {
                        return Ok((out, None));
                    }
                    scanned += 1;
                    if let Some(v) = self.storage.get(Table::AuditLog, &key)? {
                        let entry: AuditEntry = serde_json::from_slice(&v)?;
                        if filter.keeps(&entry) {
                            out.push(entry);
                            if out.len() >= limit {
                                return Ok((out, Some(key)));
                            }
                        }
                    }
                    if scanned >= max_scan {
                        return Ok((out, Some(key)));
                    }
                }
            }
            None => {
                let start = match after {
                    Some(k) => {
                        let mut k = k.to_vec();
                        k.push(0);
                        k
                    }
                    None => entry_key(filter.from, 0),
                };
                for item in self
                    .storage
                    .scan_from(Table::AuditLog, b"", &start, false)?
                {
                    let (k, v) = item?;
                    if k.len() < 8 || entry_ts(&k) >= filter.to {
                        return Ok((out, None));
                    }
                    scanned += 1;
                    let entry: AuditEntry = serde_json::from_slice(&v)?;
                    if filter.keeps(&entry) {
                        out.push(entry);
                        if out.len() >= limit {
                            return Ok((out, Some(k.to_vec())));
                        }
                    }
                    if scanned >= max_scan {
                        return Ok((out, Some(k.to_vec())));
                    }
                }
            }
        }
        Ok((out, None))
    }

    /// Delete entries older than `cutoff` (ms), with their index rows: the entries go by key
    /// range, a batch of at most [`PURGE_CHUNK`] at a time, at most `max_rows` in all. Returns
    /// how many were deleted.
    pub fn purge_before(&self, cutoff: u64, max_rows: usize) -> Result<usize> {
        let mut deleted = 0usize;
        let start = entry_key(0, 0);
        // Bounded: every round deletes a chunk or ends.
        for _ in 0..max_rows.div_ceil(PURGE_CHUNK).max(1) {
            let mut last: Option<Vec<u8>> = None;
            let mut batch = self.storage.batch();
            let mut n = 0usize;
            for item in self
                .storage
                .scan_from(Table::AuditLog, b"", &start, false)?
            {
                let (k, v) = item?;
                if k.len() < 8 || entry_ts(&k) >= cutoff || n >= PURGE_CHUNK {
                    break;
                }
                if let Ok(entry) = serde_json::from_slice::<AuditEntry>(&v) {
                    if let Some(user) = &entry.user {
                        let mut ik = user.as_bytes().to_vec();
                        ik.push(0xff);
                        ik.extend_from_slice(&k);
                        batch.delete(Table::AuditByUser, &ik)?;
                    }
                }
                last = Some(k.to_vec());
                n += 1;
            }
            let Some(mut end) = last else { break };
            end.push(0);
            batch.delete_range(Table::AuditLog, &start, &end)?;
            batch.commit()?;
            deleted += n;
            if n < PURGE_CHUNK || deleted >= max_rows {
                break;
            }
        }
        Ok(deleted)
    }

    /// The retention job: delete what is older than `audit_retention_days` (0 keeps all).
    pub fn run_retention(&self) -> Result<usize> {
        if self.retention_days == 0 {
            return Ok(0);
        }
        let cutoff = utils::now_ms().saturating_sub(self.retention_days.saturating_mul(86_400_000));
        self.purge_before(cutoff, 1_000_000)
    }
}

/// The time part of an entry key.
fn entry_ts(key: &[u8]) -> u64 {
    key.get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(u64::MAX)
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
        assert!(h.starts_with("hmac:") && !h.contains("192.0.2"));
        assert_eq!(log.ip(Some(v4)), Some(h));
        config.audit_ip_mode = IpMode::Drop;
        assert_eq!(AuditLog::new(storage, &config).ip(Some(v4)), None);
    }
}
