//! The push rule set of each user: stored as account data `m.push_rules` (so clients see changes
//! through sync), with the server's default rules merged in on every load (new defaults reach old
//! accounts; the user's enabled/actions changes to defaults are kept).

use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;
use ruma::{
    push::{InsertPushRuleError, RemovePushRuleError, Ruleset},
    OwnedUserId, UserId,
};
use serde_json::json;

use crate::{
    error::{Error, Result},
    service::account_data::AccountData,
};

/// Parsed rule sets kept in memory; the write path evaluates them for every event.
const CACHE_ENTRIES: usize = 50_000;

/// A parsed rule set and what evaluating it needs.
pub struct Rules {
    pub set: Ruleset,
    /// Some enabled rule asks for the user's display name (legacy `contains_display_name`):
    /// only then is the name looked up for each event.
    pub needs_display_name: bool,
    /// The server defaults, unchanged: every such user gets the same result for an event that
    /// does not name them.
    pub is_default: bool,
}

impl Rules {
    // The legacy condition is deprecated in ruma, which is why it is looked for here.
    #[allow(deprecated)]
    fn new(set: Ruleset, is_default: bool) -> Rules {
        let needs_display_name = set.iter().any(|r| {
            r.enabled()
                && matches!(
                    r,
                    ruma::push::AnyPushRuleRef::Override(c) | ruma::push::AnyPushRuleRef::Underride(c)
                        if c.conditions.iter().any(|c| matches!(c, ruma::push::PushCondition::ContainsDisplayName))
                )
        });
        Rules {
            set,
            needs_display_name,
            is_default,
        }
    }
}

pub struct RuleStore {
    account_data: AccountData,
    cache: Mutex<HashMap<OwnedUserId, Arc<Rules>>>,
    /// Serializes read-modify-write of one rule set (rare: a user editing rules).
    write: Mutex<()>,
}

impl RuleStore {
    pub fn new(account_data: AccountData) -> RuleStore {
        RuleStore {
            account_data,
            cache: Mutex::new(HashMap::new()),
            write: Mutex::new(()),
        }
    }

    /// The user's rule set: what they stored plus any server default they do not have.
    pub fn get(&self, user: &UserId) -> Result<Arc<Rules>> {
        if let Some(r) = self.cache.lock().get(user) {
            return Ok(r.clone());
        }
        let (set, is_default) = self.load(user)?;
        let rules = Arc::new(Rules::new(set, is_default));
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        // An `update` that finished while this load ran has cached the newer rules: keep those.
        Ok(cache.entry(user.to_owned()).or_insert(rules).clone())
    }

    /// The rule set, and whether it is the untouched server default.
    fn load(&self, user: &UserId) -> Result<(Ruleset, bool)> {
        let stored = self
            .account_data
            .get(user, None, "m.push_rules")?
            .and_then(|v| serde_json::from_value::<Ruleset>(v.get("global")?.clone()).ok());
        let is_default = stored.is_none();
        let mut rules = stored.unwrap_or_else(|| Ruleset::server_default(user));
        rules.update_with_server_default(Ruleset::server_default(user));
        Ok((rules, is_default))
    }

    /// Change the user's rule set with `change` and store it (as account data, which wakes the
    /// user's sync so every client sees the new rules).
    pub fn update<T>(
        &self,
        user: &UserId,
        change: impl FnOnce(&mut Ruleset) -> Result<T>,
    ) -> Result<T> {
        let _guard = self.write.lock();
        let (mut rules, _) = self.load(user)?;
        let out = change(&mut rules)?;
        self.account_data
            .set(user, None, "m.push_rules", &json!({ "global": rules }))?;
        self.cache
            .lock()
            .insert(user.to_owned(), Arc::new(Rules::new(rules, false)));
        Ok(out)
    }
}

/// The spec's errors for a rule that cannot be inserted where asked.
pub fn insert_error(e: InsertPushRuleError) -> Error {
    match e {
        InsertPushRuleError::ServerDefaultRuleId => {
            Error::invalid_param("Rule ids starting with '.' are reserved for server-default rules")
        }
        InsertPushRuleError::InvalidRuleId => {
            Error::invalid_param("Rule ids may not contain '/' or '\\'")
        }
        InsertPushRuleError::RelativeToServerDefaultRule => {
            Error::bad_request("Rules cannot be placed relative to a server-default rule")
        }
        InsertPushRuleError::UnknownRuleId => {
            Error::bad_request("The before or after rule was not found")
        }
        InsertPushRuleError::BeforeHigherThanAfter => {
            Error::bad_request("'before' is more important than 'after'")
        }
        _ => Error::bad_request("The rule cannot be inserted"),
    }
}

pub fn remove_error(e: RemovePushRuleError) -> Error {
    match e {
        RemovePushRuleError::ServerDefault => {
            Error::invalid_param("Server-default rules cannot be deleted")
        }
        _ => Error::not_found("The push rule was not found"),
    }
}
