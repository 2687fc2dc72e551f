//! Presence (off unless `allow_presence`). Each user's latest state is one row with the stream
//! count of its latest change; sync sends the rows of users sharing a room that changed.

use std::sync::Arc;

use ruma::{OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    error::Result,
    service::globals::Globals,
    storage::{Storage, Table},
};

/// A user counts as "currently active" this long after their last activity.
const ACTIVE_MS: u64 = 5 * 60 * 1000;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PresenceState {
    pub presence: String,
    #[serde(default)]
    pub status_msg: Option<String>,
    pub last_active_ts: u64,
    pub count: u64,
}

impl PresenceState {
    /// The `content` of an `m.presence` event / the GET response.
    pub fn content(&self) -> Value {
        let ago = crate::utils::now_ms().saturating_sub(self.last_active_ts);
        let mut c = json!({
            "presence": self.presence,
            "last_active_ago": ago,
            "currently_active": self.presence == "online" && ago < ACTIVE_MS,
        });
        if let Some(m) = &self.status_msg {
            c["status_msg"] = Value::String(m.clone());
        }
        c
    }
}

pub struct Presence {
    storage: Storage,
    globals: Arc<Globals>,
}

impl Presence {
    pub fn new(storage: Storage, globals: Arc<Globals>) -> Presence {
        Presence { storage, globals }
    }

    pub fn get(&self, user: &UserId) -> Result<Option<PresenceState>> {
        self.storage.get_json(Table::Presence, user.as_bytes())
    }

    /// Set the user's presence. `status_msg` None keeps the current message (sync's
    /// `set_presence` does not touch it). A change gets a stream count and wakes `wake`; a mere
    /// refresh of the activity time does not, so syncing clients do not wake each other.
    /// Returns whether it changed (other servers are told of changes only).
    pub fn set(
        &self,
        user: &UserId,
        presence: &str,
        status_msg: Option<Option<String>>,
        wake: impl FnOnce() -> Result<Vec<OwnedUserId>>,
    ) -> Result<bool> {
        let now = crate::utils::now_ms();
        let current = self.get(user)?;
        let new_msg = match status_msg {
            Some(m) => m,
            None => current.as_ref().and_then(|c| c.status_msg.clone()),
        };
        if let Some(cur) = &current {
            if cur.presence == presence && cur.status_msg == new_msg {
                let refreshed = PresenceState {
                    last_active_ts: now,
                    ..cur.clone()
                };
                self.storage.put(
                    Table::Presence,
                    user.as_bytes(),
                    &serde_json::to_vec(&refreshed)?,
                )?;
                return Ok(false);
            }
        }
        let mut wake = wake()?;
        wake.push(user.to_owned());
        let pending = self.globals.counter.next()?;
        let state = PresenceState {
            presence: presence.to_owned(),
            status_msg: new_msg,
            last_active_ts: now,
            count: pending.get(),
        };
        self.storage.put(
            Table::Presence,
            user.as_bytes(),
            &serde_json::to_vec(&state)?,
        )?;
        pending.finish(wake);
        Ok(true)
    }

    /// Store the presence another server reported for one of its users (`last_active_ago` ms
    /// before now) and wake `wake`.
    pub fn set_remote(
        &self,
        user: &UserId,
        presence: &str,
        status_msg: Option<String>,
        last_active_ago: u64,
        wake: Vec<OwnedUserId>,
    ) -> Result<()> {
        let pending = self.globals.counter.next()?;
        let state = PresenceState {
            presence: presence.to_owned(),
            status_msg,
            last_active_ts: crate::utils::now_ms().saturating_sub(last_active_ago),
            count: pending.get(),
        };
        self.storage.put(
            Table::Presence,
            user.as_bytes(),
            &serde_json::to_vec(&state)?,
        )?;
        pending.finish(wake);
        Ok(())
    }
}
