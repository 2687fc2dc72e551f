//! Push: the user's push rules, their evaluation for every new event (notification and highlight
//! counts, `/notifications`), pushers, and delivery to push gateways.
//!
//! - `rules`: the rule set per user (account data `m.push_rules`, server defaults merged in).
//! - `evaluate`: runs the rules of every local recipient of an event inside the event's write
//!   batch, so counts are never behind or ahead of the timeline, even after a crash.
//! - `notifications`: the rows evaluation writes, unread counts, read receipts clearing them.
//! - `pushers`: the pushers clients set; `gateway`: the task delivering to push gateways.

pub mod evaluate;
pub mod gateway;
pub mod notifications;
pub mod pushers;
pub mod rules;

use std::{collections::HashSet, sync::Arc};

use parking_lot::Mutex;
use ruma::OwnedUserId;
use tokio::sync::Notify;

use crate::{service::account_data::AccountData, service::globals::Globals, storage::Storage};

pub struct Push {
    pub rules: Arc<rules::RuleStore>,
    pub notifications: notifications::Notifications,
    pub pushers: pushers::Pushers,
    /// Users with new notifications the gateway task has not looked at yet.
    pub pending: Arc<PendingPushes>,
}

impl Push {
    pub fn new(storage: Storage, globals: Arc<Globals>, pending: Arc<PendingPushes>) -> Push {
        Push {
            rules: Arc::new(rules::RuleStore::new(AccountData::new(
                storage.clone(),
                globals.clone(),
            ))),
            notifications: notifications::Notifications::new(storage.clone()),
            pushers: pushers::Pushers::new(storage, globals, pending.clone()),
            pending,
        }
    }
}

/// Users whose new notifications may need pushing, and the bell that wakes the gateway task.
/// Filled by the write path, drained by `gateway`.
#[derive(Default)]
pub struct PendingPushes {
    users: Mutex<HashSet<OwnedUserId>>,
    wake: Notify,
    /// Users who have a pusher (refreshed by every sweep of the gateway task, added to when a
    /// pusher is set): notifications of everybody else need no delivery and wake nobody.
    with_pushers: Mutex<HashSet<OwnedUserId>>,
}

/// Most users remembered between two rounds of the gateway task; beyond that the task checks
/// every pusher anyway.
const MAX_PENDING_USERS: usize = 100_000;

impl PendingPushes {
    pub fn add(&self, users: impl IntoIterator<Item = OwnedUserId>) {
        let mut added = false;
        {
            let with_pushers = self.with_pushers.lock();
            let mut set = self.users.lock();
            for u in users {
                if set.len() >= MAX_PENDING_USERS {
                    break;
                }
                if with_pushers.contains(&u) {
                    set.insert(u);
                    added = true;
                }
            }
        }
        if added {
            self.wake.notify_one();
        }
    }

    /// The user now has a pusher.
    pub fn user_has_pusher(&self, user: &ruma::UserId) {
        self.with_pushers.lock().insert(user.to_owned());
    }

    /// Everybody who has a pusher, as the gateway task just read them.
    fn set_users_with_pushers(&self, users: HashSet<OwnedUserId>) {
        *self.with_pushers.lock() = users;
    }

    fn take(&self) -> HashSet<OwnedUserId> {
        std::mem::take(&mut *self.users.lock())
    }
}
