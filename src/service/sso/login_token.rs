//! One-time login tokens (`m.login.token`): issued at the end of an SSO login, exchanged once
//! for an access token within two minutes. Only their SHA-256 is stored.

use ruma::{OwnedUserId, UserId};
use serde::{Deserialize, Serialize};

use crate::{
    error::Result,
    storage::{Storage, Table},
    utils,
};

/// How long a login token stays usable.
pub const LIFETIME_MS: u64 = 120_000;
/// Expired tokens looked at (and deleted) per issued token, so unused ones do not pile up.
const SWEEP: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginTokenRecord {
    pub user_id: OwnedUserId,
    pub expires_ms: u64,
    /// The login method for the audit entry (`sso:<idp>`).
    pub method: String,
}

/// Issue a token for `user`.
pub fn issue(storage: &Storage, user: &UserId, method: &str) -> Result<String> {
    let token = utils::random_string(40);
    let now = utils::now_ms();
    let rec = LoginTokenRecord {
        user_id: user.to_owned(),
        expires_ms: now + LIFETIME_MS,
        method: method.to_owned(),
    };
    let mut b = storage.batch();
    for item in storage.scan_prefix(Table::LoginTokens, b"")?.take(SWEEP) {
        let (k, v) = item?;
        let old: Option<LoginTokenRecord> = serde_json::from_slice(&v).ok();
        if old.is_none_or(|o| o.expires_ms <= now) {
            b.delete(Table::LoginTokens, &k)?;
        }
    }
    b.put(
        Table::LoginTokens,
        &utils::token_hash(&token),
        &serde_json::to_vec(&rec)?,
    )?;
    b.commit()?;
    Ok(token)
}

/// Use a token: its record if it exists and has not expired; it is deleted either way. The
/// caller holds the lock that makes this read-and-delete happen once.
pub fn consume(storage: &Storage, token: &str) -> Result<Option<LoginTokenRecord>> {
    let key = utils::token_hash(token);
    let Some(v) = storage.get(Table::LoginTokens, &key)? else {
        return Ok(None);
    };
    let mut b = storage.batch();
    b.delete(Table::LoginTokens, &key)?;
    b.commit()?;
    let rec: Option<LoginTokenRecord> = serde_json::from_slice(&v).ok();
    Ok(rec.filter(|r| r.expires_ms > utils::now_ms()))
}
