//! The register of third-party services (A11): every outbound destination the server talks to
//! (federation servers, push gateways) with its first and last contact and how often it was
//! contacted. Contacts are counted in memory (a lock and a map update per outgoing request) and
//! written to `contact_register` periodically, at shutdown and before the register is read, so
//! outgoing traffic costs no database write. The first contact of a federation server on a day
//! also goes to the audit log (`federation_contact`).

use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::audit::AuditLog;
use crate::{
    error::Result,
    storage::{keys, Storage, Table},
    utils,
};

/// Kinds of destinations.
pub const FEDERATION: &str = "federation";
pub const PUSH_GATEWAY: &str = "push_gateway";
/// Application services (bridges), by their URL.
pub const APPSERVICE: &str = "appservice";
/// An OpenID Connect provider users log in with (discovery, keys, token endpoint).
pub const IDENTITY_PROVIDER: &str = "identity_provider";

/// Most destinations counted in memory between flushes; one more flushes at once.
const MAX_PENDING: usize = 10_000;
const DAY_MS: u64 = 86_400_000;

/// One destination as the register keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DestinationRecord {
    pub kind: String,
    pub destination: String,
    /// First and last contact (ms since the epoch).
    pub first_contact_ts: u64,
    pub last_contact_ts: u64,
    /// Requests made to it.
    pub count: u64,
}

#[derive(Default)]
struct Pending {
    first: u64,
    last: u64,
    count: u64,
    /// The day (ms / one day) of the last `federation_contact` audit entry.
    audited_day: Option<u64>,
}

pub struct Register {
    storage: Storage,
    audit: Arc<AuditLog>,
    pending: Mutex<HashMap<(&'static str, String), Pending>>,
    /// One flush at a time (each reads and rewrites the rows it merges into).
    flushing: Mutex<()>,
}

impl Register {
    pub fn new(storage: Storage, audit: Arc<AuditLog>) -> Register {
        Register {
            storage,
            audit,
            pending: Mutex::new(HashMap::new()),
            flushing: Mutex::new(()),
        }
    }

    /// Count one contact of `destination`.
    pub fn contact(&self, kind: &'static str, destination: &str) {
        let now = utils::now_ms();
        let day = now / DAY_MS;
        let (first_today, full) = {
            let mut pending = self.pending.lock();
            let full = pending.len() >= MAX_PENDING;
            let p = pending.entry((kind, destination.to_owned())).or_default();
            if p.count == 0 {
                p.first = now;
            }
            p.count += 1;
            p.last = now;
            let first_today = p.audited_day != Some(day);
            p.audited_day = Some(day);
            (first_today, full)
        };
        if first_today && kind == FEDERATION {
            let mut entry = self.audit.entry("federation_contact", None, None);
            // Not the client's address: the server contacts, not a user.
            entry.ip = None;
            entry.user_agent = None;
            entry.detail = json!({ "server": destination });
            self.audit.note(entry);
        }
        if full {
            if let Err(e) = self.flush() {
                tracing::error!(error = %e, "could not write the register of destinations");
            }
        }
    }

    /// Write the counted contacts to the table.
    pub fn flush(&self) -> Result<()> {
        let _one = self.flushing.lock();
        let taken: Vec<((&'static str, String), Pending)> = {
            let mut pending = self.pending.lock();
            let mut out = Vec::new();
            for (k, p) in pending.iter_mut() {
                if p.count > 0 {
                    out.push((
                        k.clone(),
                        Pending {
                            first: p.first,
                            last: p.last,
                            count: p.count,
                            audited_day: None,
                        },
                    ));
                    p.count = 0;
                }
            }
            // Beyond the bound, forget the (flushed) entries: their next contact re-audits at most once.
            if pending.len() >= MAX_PENDING {
                pending.clear();
            }
            out
        };
        if taken.is_empty() {
            return Ok(());
        }
        let mut batch = self.storage.batch();
        for ((kind, destination), p) in taken {
            let key = keys::join(&[kind, destination.as_str()]);
            let rec = match self
                .storage
                .get_json::<DestinationRecord>(Table::ContactRegister, &key)?
            {
                Some(mut r) => {
                    r.first_contact_ts = r.first_contact_ts.min(p.first);
                    r.last_contact_ts = r.last_contact_ts.max(p.last);
                    r.count = r.count.saturating_add(p.count);
                    r
                }
                None => DestinationRecord {
                    kind: kind.to_owned(),
                    destination,
                    first_contact_ts: p.first,
                    last_contact_ts: p.last,
                    count: p.count,
                },
            };
            batch.put(Table::ContactRegister, &key, &serde_json::to_vec(&rec)?)?;
        }
        batch.commit()
    }

    /// Every destination contacted, by kind and name (flushes first).
    pub fn list(&self) -> Result<Vec<DestinationRecord>> {
        self.flush()?;
        let mut out = Vec::new();
        for item in self.storage.scan_prefix(Table::ContactRegister, b"")? {
            let (_, v) = item?;
            out.push(serde_json::from_slice(&v)?);
        }
        Ok(out)
    }
}

/// How often counted contacts are written to the table.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// How often the audit log's retention job runs (and once at start).
const RETENTION_EVERY: u32 = 60; // flush periods: an hour

/// The background jobs of the register and the audit log: flush the counted contacts every
/// minute, delete audit entries past `audit_retention_days` a minute after the start and then
/// every hour. Ends once the services are gone.
pub async fn run_jobs(services: std::sync::Weak<crate::service::Services>) {
    let mut round: u32 = 0;
    loop {
        // First a pause: the first retention run comes a minute after the start.
        tokio::time::sleep(FLUSH_EVERY).await;
        {
            let Some(s) = services.upgrade() else { return };
            if round.is_multiple_of(RETENTION_EVERY) {
                match s.audit.run_retention() {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "audit log retention"),
                    Err(e) => tracing::error!(error = %e, "audit log retention failed"),
                }
            }
            if let Err(e) = s.register.flush() {
                tracing::error!(error = %e, "could not write the register of destinations");
            }
        }
        round = round.wrapping_add(1);
    }
}
