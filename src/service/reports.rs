//! Reports of rooms, events and users, kept for the server's administrators, and OpenID tokens
//! that let a third party confirm who a user is (through the federation `/openid/userinfo`).

use ruma::{EventId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    error::{Error, Result},
    storage::{Storage, Table},
    utils,
};

/// Longest `reason` a report may carry.
pub const MAX_REASON_BYTES: usize = 10_000;
/// How long an OpenID token is valid.
pub const OPENID_TOKEN_LIFETIME_SECS: u64 = 3600;

/// One report, as administrators will read it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub reporter: String,
    /// "room", "event" or "user".
    pub kind: String,
    pub room_id: Option<String>,
    pub event_id: Option<String>,
    pub user_id: Option<String>,
    pub reason: Option<String>,
    pub score: Option<i64>,
    pub received_ts: u64,
}

#[derive(Serialize, Deserialize)]
struct OpenIdRecord {
    user_id: String,
    expires_ms: u64,
}

pub struct Reports {
    storage: Storage,
    /// Orders reports that arrive in the same millisecond.
    sequence: std::sync::atomic::AtomicU64,
}

/// What a report names.
pub enum Target<'a> {
    Room(&'a RoomId),
    Event(&'a RoomId, &'a EventId),
    User(&'a UserId),
}

/// The optional `reason` (a string, bounded) and `score` (an integer from -100 to 0) of a body.
pub fn reason_and_score(
    body: &serde_json::Map<String, Value>,
) -> Result<(Option<String>, Option<i64>)> {
    let reason = match body.get("reason") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) if r.len() <= MAX_REASON_BYTES => Some(r.clone()),
        Some(Value::String(_)) => {
            return Err(Error::invalid_param(format!(
                "The reason may be at most {MAX_REASON_BYTES} bytes"
            )))
        }
        Some(_) => return Err(Error::bad_json("reason must be a string")),
    };
    let score = match body.get("score") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_i64() {
            Some(n) if (-100..=0).contains(&n) => Some(n),
            _ => {
                return Err(Error::invalid_param(
                    "score must be an integer from -100 to 0",
                ))
            }
        },
    };
    Ok((reason, score))
}

impl Reports {
    pub fn new(storage: Storage) -> Reports {
        Reports {
            storage,
            sequence: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Keep a report. The key orders reports by arrival.
    pub fn file(
        &self,
        reporter: &UserId,
        target: Target<'_>,
        reason: Option<String>,
        score: Option<i64>,
    ) -> Result<()> {
        let (kind, room_id, event_id, user_id) = match target {
            Target::Room(r) => ("room", Some(r.to_string()), None, None),
            Target::Event(r, e) => ("event", Some(r.to_string()), Some(e.to_string()), None),
            Target::User(u) => ("user", None, None, Some(u.to_string())),
        };
        let now = utils::now_ms();
        let report = Report {
            reporter: reporter.to_string(),
            kind: kind.to_owned(),
            room_id,
            event_id,
            user_id,
            reason,
            score,
            received_ts: now,
        };
        // Time first, so that a scan lists reports in arrival order; a sequence number keeps
        // two reports of the same millisecond apart and in order.
        let seq = self
            .sequence
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut key = now.to_be_bytes().to_vec();
        key.extend_from_slice(&seq.to_be_bytes());
        self.storage
            .put(Table::Reports, &key, &serde_json::to_vec(&report)?)
    }

    /// Every report, oldest first, at most `limit`.
    pub fn list(&self, limit: usize) -> Result<Vec<Report>> {
        let mut out = Vec::new();
        for entry in self.storage.scan_prefix(Table::Reports, b"")?.take(limit) {
            let (_, v) = entry?;
            out.push(serde_json::from_slice(&v)?);
        }
        Ok(out)
    }

    /// Erasure of `user`: in every report they filed or that names them, their id becomes
    /// `pseudonym` (the report itself, its target and reason stay: an administrator may still
    /// have to act on it or account for it); their OpenID tokens are deleted. Returns (reports
    /// changed, tokens deleted). Both tables are scanned whole, at most `max_rows` rows each.
    pub fn erase_user(
        &self,
        user: &str,
        pseudonym: &str,
        max_rows: usize,
    ) -> Result<(usize, usize)> {
        let mut changed = 0;
        let mut batch = self.storage.batch();
        for entry in self
            .storage
            .scan_prefix(Table::Reports, b"")?
            .take(max_rows)
        {
            let (k, v) = entry?;
            let Ok(mut report) = serde_json::from_slice::<Report>(&v) else {
                continue;
            };
            let mut touched = false;
            if report.reporter == user {
                report.reporter = pseudonym.to_owned();
                touched = true;
            }
            if report.user_id.as_deref() == Some(user) {
                report.user_id = Some(pseudonym.to_owned());
                touched = true;
            }
            if touched {
                batch.put(Table::Reports, &k, &serde_json::to_vec(&report)?)?;
                changed += 1;
            }
        }
        let mut tokens = 0;
        for entry in self
            .storage
            .scan_prefix(Table::OpenIdTokens, b"")?
            .take(max_rows)
        {
            let (k, v) = entry?;
            let mine = serde_json::from_slice::<OpenIdRecord>(&v)
                .map(|r| r.user_id == user)
                .unwrap_or(false);
            if mine {
                batch.delete(Table::OpenIdTokens, &k)?;
                tokens += 1;
            }
        }
        batch.commit()?;
        Ok((changed, tokens))
    }

    /// A fresh OpenID token for the user: (token, lifetime in seconds).
    pub fn openid_token(&self, user: &UserId) -> Result<(String, u64)> {
        let token = utils::random_string(32);
        let record = OpenIdRecord {
            user_id: user.to_string(),
            expires_ms: utils::now_ms() + OPENID_TOKEN_LIFETIME_SECS * 1000,
        };
        self.storage.put(
            Table::OpenIdTokens,
            &utils::token_hash(&token),
            &serde_json::to_vec(&record)?,
        )?;
        Ok((token, OPENID_TOKEN_LIFETIME_SECS))
    }

    /// The user an unexpired OpenID token was issued to.
    pub fn openid_user(&self, token: &str) -> Result<Option<String>> {
        let record: Option<OpenIdRecord> = self
            .storage
            .get_json(Table::OpenIdTokens, &utils::token_hash(token))?;
        Ok(record
            .filter(|r| r.expires_ms > utils::now_ms())
            .map(|r| r.user_id))
    }
}
