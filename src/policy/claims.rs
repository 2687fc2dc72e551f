//! What the organization's identity provider said about a user at their latest SSO or JWT
//! login: the groups it named. Closed user groups with `sso_groups` read it (D1): membership
//! follows the identity provider, and a group the provider stops naming is gone at the next login.

use std::collections::BTreeSet;

use ruma::UserId;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    error::Result,
    storage::{Storage, Table},
    utils,
};

/// Most group names kept per user, and the longest name kept; more (or longer) are dropped.
pub const MAX_GROUPS: usize = 256;
pub const MAX_GROUP_LEN: usize = 255;

/// The record kept per user.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClaimsRecord {
    /// The login method that brought these claims (`sso:<idp>`, `jwt`).
    pub source: String,
    /// The group names the provider gave, as given.
    pub groups: BTreeSet<String>,
    pub updated_ms: u64,
}

/// Read the group names from a claim value: an array of strings or one string; anything else
/// (and overlong names) is ignored. Bounded by [`MAX_GROUPS`].
pub fn groups_from_claim(value: Option<&Value>) -> BTreeSet<String> {
    let ok = |s: &&str| !s.is_empty() && s.len() <= MAX_GROUP_LEN;
    match value {
        Some(Value::String(s)) => [s.as_str()]
            .into_iter()
            .filter(ok)
            .map(str::to_owned)
            .collect(),
        Some(Value::Array(items)) => items
            .iter()
            .take(MAX_GROUPS)
            .filter_map(Value::as_str)
            .filter(ok)
            .map(str::to_owned)
            .collect(),
        _ => BTreeSet::new(),
    }
}

/// A login through the identity provider: keep its groups, and when a group value the user had
/// is gone, make them leave the rooms bound to groups they are no longer in (as when an admin
/// removes a member, `group_sweep`).
pub async fn record_login(
    services: &crate::service::Services,
    user: &UserId,
    source: &str,
    groups: BTreeSet<String>,
) -> Result<()> {
    let before = get(&services.storage, user)?
        .map(|r| r.groups)
        .unwrap_or_default();
    let lost = before.iter().any(|g| !groups.contains(g));
    record(&services.storage, user, source, groups)?;
    if lost && services.access.groups.active() {
        super::group_sweep::remove_user_outside(services, user).await?;
    }
    Ok(())
}

/// Replace the user's claims with those of this login.
pub fn record(
    storage: &Storage,
    user: &UserId,
    source: &str,
    groups: BTreeSet<String>,
) -> Result<()> {
    let rec = ClaimsRecord {
        source: source.to_owned(),
        groups,
        updated_ms: utils::now_ms(),
    };
    storage.put(
        Table::IdpClaims,
        user.as_str().as_bytes(),
        &serde_json::to_vec(&rec)?,
    )
}

/// The user's claims, if they ever logged in through SSO or JWT.
pub fn get(storage: &Storage, user: &UserId) -> Result<Option<ClaimsRecord>> {
    storage.get_json(Table::IdpClaims, user.as_str().as_bytes())
}

/// The group names of the user's latest SSO/JWT login (empty when none or unreadable: a user
/// whose claims cannot be read is in no claim-based group, the closed default).
pub fn groups(storage: &Storage, user: &UserId) -> BTreeSet<String> {
    match get(storage, user) {
        Ok(Some(r)) => r.groups,
        Ok(None) => BTreeSet::new(),
        Err(e) => {
            tracing::error!(error = %e, "could not read a user's identity-provider claims");
            BTreeSet::new()
        }
    }
}

/// Property tests: any group claim an identity provider sends gives a bounded set of names.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, json, text};

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn fuzz_group_claims(value in prop_oneof![
            json(),
            prop::collection::vec(text(), 0..600).prop_map(Value::from),
        ]) {
            let groups = groups_from_claim(Some(&value));
            prop_assert!(groups.len() <= MAX_GROUPS);
            prop_assert!(groups.iter().all(|g| !g.is_empty() && g.len() <= MAX_GROUP_LEN));
        }
    }
}
