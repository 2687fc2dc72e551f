//! Pushers: where a user's devices want their notifications pushed (an HTTP push gateway).
//! Each remembers the last notification delivered (`cursor`), so delivery resumes after a
//! restart without resending or skipping.

use std::sync::Arc;

use parking_lot::Mutex;
use ruma::{
    api::client::push::{Pusher, PusherKind},
    OwnedUserId, UserId,
};
use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    service::globals::Globals,
    storage::{keys, Storage, Table},
    utils,
};

/// The spec's bounds: pushkey at most 512 bytes, app_id at most 64 characters.
const MAX_PUSHKEY_BYTES: usize = 512;
const MAX_APP_ID_CHARS: usize = 64;
/// The path every push gateway serves notifications on.
pub const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";
/// Pushers one user may have (one per app per device is normal).
const MAX_PUSHERS_PER_USER: usize = 100;

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct StoredPusher {
    pub user_id: OwnedUserId,
    /// The pusher as the client set it (spec JSON).
    pub pusher: serde_json::Value,
    /// The device that set it; deleting the device deletes its pushers.
    pub device_id: String,
    /// When it was set (ms): `pushkey_ts` in notifications.
    pub created_ms: u64,
    /// Stream position of the last notification delivered (or skipped).
    pub cursor: u64,
}

impl StoredPusher {
    pub fn app_id(&self) -> &str {
        self.pusher
            .get("app_id")
            .and_then(|v| v.as_str())
            .unwrap_or("")
    }
    pub fn pushkey(&self) -> &str {
        self.pusher
            .get("pushkey")
            .and_then(|v| v.as_str())
            .unwrap_or("")
    }
    fn key(&self) -> Vec<u8> {
        keys::join(&[self.user_id.as_str(), self.app_id(), self.pushkey()])
    }
}

pub struct Pushers {
    storage: Storage,
    globals: Arc<Globals>,
    pending: Arc<super::PendingPushes>,
    /// Serializes read-modify-write of pusher records (client changes and delivery cursors).
    write: Mutex<()>,
}

impl Pushers {
    pub fn new(
        storage: Storage,
        globals: Arc<Globals>,
        pending: Arc<super::PendingPushes>,
    ) -> Pushers {
        Pushers {
            storage,
            globals,
            pending,
            write: Mutex::new(()),
        }
    }

    /// Create or replace a pusher. Unless `append`, the same app id and pushkey of other users
    /// go (the device changed hands).
    pub fn set(&self, user: &UserId, device_id: &str, pusher: &Pusher, append: bool) -> Result<()> {
        validate(pusher)?;
        let _guard = self.write.lock();
        let (app_id, pushkey) = (pusher.ids.app_id.as_str(), pusher.ids.pushkey.as_str());
        let key = keys::join(&[user.as_str(), app_id, pushkey]);
        let exists = self.storage.contains(Table::Pushers, &key)?;
        if !exists && self.of_user(user)?.len() >= MAX_PUSHERS_PER_USER {
            return Err(Error::new(
                crate::error::ErrCode::LimitExceeded,
                "Too many pushers for this user",
            ));
        }
        let mut batch = self.storage.batch();
        if !append {
            for other in self.all()? {
                if other.user_id != user && other.app_id() == app_id && other.pushkey() == pushkey {
                    batch.delete(Table::Pushers, &other.key())?;
                }
            }
        }
        let record = StoredPusher {
            user_id: user.to_owned(),
            pusher: serde_json::to_value(pusher)?,
            device_id: device_id.to_owned(),
            created_ms: utils::now_ms(),
            // Only notifications after this moment are pushed.
            cursor: self.globals.counter.watermark(),
        };
        batch.put(Table::Pushers, &key, &serde_json::to_vec(&record)?)?;
        batch.commit()?;
        self.pending.user_has_pusher(user);
        Ok(())
    }

    /// Delete a pusher (no error when there is none).
    pub fn delete(&self, user: &UserId, app_id: &str, pushkey: &str) -> Result<()> {
        let _guard = self.write.lock();
        let mut batch = self.storage.batch();
        batch.delete(
            Table::Pushers,
            &keys::join(&[user.as_str(), app_id, pushkey]),
        )?;
        batch.commit()
    }

    pub fn of_user(&self, user: &UserId) -> Result<Vec<StoredPusher>> {
        self.scan(&keys::prefix(&[user.as_str()]))
    }

    pub fn all(&self) -> Result<Vec<StoredPusher>> {
        self.scan(&[])
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<StoredPusher>> {
        let mut out = Vec::new();
        for entry in self.storage.scan_prefix(Table::Pushers, prefix)? {
            let (_, v) = entry?;
            if let Ok(p) = serde_json::from_slice(&v) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Move the delivery cursor of a pusher, unless it was deleted or replaced meanwhile.
    pub fn advance(&self, pusher: &StoredPusher, cursor: u64) -> Result<()> {
        let _guard = self.write.lock();
        let key = pusher.key();
        let Some(mut current) = self
            .storage
            .get_json::<StoredPusher>(Table::Pushers, &key)?
        else {
            return Ok(());
        };
        if current.created_ms != pusher.created_ms || current.cursor >= cursor {
            return Ok(());
        }
        current.cursor = cursor;
        self.storage
            .put(Table::Pushers, &key, &serde_json::to_vec(&current)?)
    }

    /// The gateway rejected the pushkey: forget the pusher.
    pub fn reject(&self, pusher: &StoredPusher) -> Result<()> {
        self.delete(&pusher.user_id, pusher.app_id(), pusher.pushkey())
    }
}

/// Delete the pushers a device set, in the batch that deletes the device (logout, device
/// deletion, deactivation).
pub fn remove_device_rows(
    storage: &Storage,
    batch: &mut crate::storage::Batch,
    user: &UserId,
    device_id: &str,
) -> Result<()> {
    for entry in storage.scan_prefix(Table::Pushers, &keys::prefix(&[user.as_str()]))? {
        let (k, v) = entry?;
        let of_device =
            serde_json::from_slice::<StoredPusher>(&v).map_or(true, |p| p.device_id == device_id);
        if of_device {
            batch.delete(Table::Pushers, &k)?;
        }
    }
    Ok(())
}

fn validate(pusher: &Pusher) -> Result<()> {
    if pusher.ids.pushkey.len() > MAX_PUSHKEY_BYTES {
        return Err(Error::invalid_param("pushkey is longer than 512 bytes"));
    }
    if pusher.ids.app_id.chars().count() > MAX_APP_ID_CHARS {
        return Err(Error::invalid_param("app_id is longer than 64 characters"));
    }
    if pusher.ids.pushkey.is_empty() || pusher.ids.app_id.is_empty() {
        return Err(Error::invalid_param("app_id and pushkey must not be empty"));
    }
    match &pusher.kind {
        PusherKind::Http(http) => {
            let url = http
                .url
                .parse::<http::Uri>()
                .map_err(|_| Error::invalid_param("data.url is not a URL"))?;
            if !matches!(url.scheme_str(), Some("https" | "http")) || url.host().is_none() {
                return Err(Error::invalid_param("data.url must be an http(s) URL"));
            }
            if url.path() != NOTIFY_PATH {
                return Err(Error::invalid_param(format!(
                    "data.url must have the path {NOTIFY_PATH}"
                )));
            }
            Ok(())
        }
        PusherKind::Email(_) => Err(Error::invalid_param(
            "Email pushers need a bound email address; this server binds none",
        )),
        _ => Err(Error::invalid_param("Unknown pusher kind")),
    }
}
