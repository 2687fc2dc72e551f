//! From the identity provider's user to an account here. A provider's user (`sub`) is linked to
//! one account at their first login and logs into it from then on, whatever their name claims
//! say later. A new link takes the localpart from the configured claim, sanitized; when that
//! localpart is taken, `allow_existing_users` links to the existing account, otherwise the
//! first free `<localpart>1` ... `<localpart>99` is taken.

use ruma::{OwnedUserId, UserId};
use serde_json::{Map, Value};

use super::{Provider, SsoFailure};
use crate::{
    service::Services,
    storage::{keys, Table},
};

/// Numbered alternatives tried when a localpart is taken.
const MAX_SUFFIX: u32 = 99;
/// Longest subject accepted.
const MAX_SUBJECT: usize = 255;

/// Turn a claim into a localpart: lowercase, characters outside a-z 0-9 . _ = - / + become `_`,
/// at most 64 characters. None when nothing usable is left.
pub fn sanitize_localpart(raw: &str) -> Option<String> {
    let mut out: String = raw
        .trim()
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || "._=-/+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    // A name of only replaced characters says nothing about the user.
    if out.chars().all(|c| c == '_') {
        out.clear();
    }
    (!out.is_empty()).then_some(out)
}

/// The account linked to `idp`'s user `subject`, if any.
pub fn linked(
    services: &Services,
    idp: &str,
    subject: &str,
) -> crate::error::Result<Option<OwnedUserId>> {
    let v = services
        .storage
        .get(Table::SsoSubjects, &keys::join(&[idp, subject]))?;
    Ok(v.and_then(|v| String::from_utf8(v).ok())
        .and_then(|s| UserId::parse(s).ok()))
}

/// The subject of `idp` linked to `user`, if any.
pub fn linked_subject(
    services: &Services,
    user: &UserId,
    idp: &str,
) -> crate::error::Result<Option<String>> {
    Ok(services
        .storage
        .get(Table::SsoUserSubjects, &keys::join(&[user.as_str(), idp]))?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// Link `idp`'s user `subject` to `user`.
pub fn link(
    services: &Services,
    idp: &str,
    subject: &str,
    user: &UserId,
) -> crate::error::Result<()> {
    let mut b = services.storage.batch();
    b.put(
        Table::SsoSubjects,
        &keys::join(&[idp, subject]),
        user.as_str().as_bytes(),
    )?;
    b.put(
        Table::SsoUserSubjects,
        &keys::join(&[user.as_str(), idp]),
        subject.as_bytes(),
    )?;
    b.commit()
}

/// The providers `user` is linked to (at most 100).
pub fn linked_idps(services: &Services, user: &UserId) -> crate::error::Result<Vec<String>> {
    let prefix = keys::prefix(&[user.as_str()]);
    let mut out = Vec::new();
    for item in services
        .storage
        .scan_prefix(Table::SsoUserSubjects, &prefix)?
        .take(100)
    {
        let (k, _) = item?;
        out.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
    }
    Ok(out)
}

/// Forget every link of `user` (erasure).
pub fn unlink_user(services: &Services, user: &UserId) -> crate::error::Result<()> {
    let prefix = keys::prefix(&[user.as_str()]);
    let mut b = services.storage.batch();
    for item in services
        .storage
        .scan_prefix(Table::SsoUserSubjects, &prefix)?
        .take(1000)
    {
        let (k, subject) = item?;
        let idp = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        let subject = String::from_utf8_lossy(&subject).into_owned();
        b.delete(Table::SsoSubjects, &keys::join(&[&idp, &subject]))?;
        b.delete(Table::SsoUserSubjects, &k)?;
    }
    b.delete(Table::IdpClaims, user.as_str().as_bytes())?;
    b.commit()
}

/// The account an OIDC login logs into, made when needed.
pub fn map_oidc_user(
    services: &Services,
    provider: &Provider,
    claims: &Map<String, Value>,
) -> Result<OwnedUserId, SsoFailure> {
    let conf = &provider.conf;
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= MAX_SUBJECT)
        .ok_or_else(|| SsoFailure::idp("bad_id_token", "The ID token has no usable subject"))?;
    let idp = conf.idp_id.as_str();
    let accounts = &services.accounts;
    if let Some(user) = linked(services, idp, subject).map_err(SsoFailure::internal)? {
        ensure_active(services, &user)?;
        return Ok(user);
    }
    let localpart = claims
        .get(&conf.localpart_claim)
        .and_then(Value::as_str)
        .and_then(sanitize_localpart)
        .ok_or_else(|| {
            SsoFailure::forbidden(
                "no_localpart",
                format!(
                    "The identity provider gave no usable `{}` to name your account",
                    conf.localpart_claim
                ),
            )
        })?;
    let first = accounts
        .validate_new_localpart(&localpart)
        .map_err(|_| SsoFailure::forbidden("no_localpart", "The user name is not valid here"))?;
    if conf.allow_existing_users && accounts.exists(&first).map_err(SsoFailure::internal)? {
        ensure_active(services, &first)?;
        // Never an account a bridge owns, nor one another identity of this provider already
        // logs into (a provider user renaming themself to a taken name must not take it over).
        if services.appservices.owner_of_user(&first).is_some() {
            return Err(SsoFailure::forbidden(
                "reserved",
                "This user name belongs to a bridge on this server",
            ));
        }
        if linked_subject(services, &first, idp)
            .map_err(SsoFailure::internal)?
            .is_some()
        {
            return Err(SsoFailure::forbidden(
                "linked_to_another",
                "This account is linked to another user of your identity provider",
            ));
        }
        link(services, idp, subject, &first).map_err(SsoFailure::internal)?;
        return Ok(first);
    }
    if !conf.auto_provision {
        return Err(SsoFailure::forbidden(
            "not_provisioned",
            "There is no account for you on this server, and SSO logins do not create accounts",
        ));
    }
    let mut candidate = first;
    let mut n = 0;
    // Taken: an existing account, or an id a bridge reserved (exclusive namespace).
    let taken = |id: &UserId| -> Result<bool, SsoFailure> {
        Ok(accounts.exists(id).map_err(SsoFailure::internal)?
            || services
                .appservices
                .ensure_user_not_exclusive(id, None)
                .is_err())
    };
    while taken(&candidate)? {
        n += 1;
        if n > MAX_SUFFIX {
            return Err(SsoFailure::forbidden(
                "localpart_taken",
                "No free user name could be found for you; ask your administrator",
            ));
        }
        candidate = accounts
            .validate_new_localpart(&format!("{localpart}{n}"))
            .map_err(|_| {
                SsoFailure::forbidden("no_localpart", "The user name is not valid here")
            })?;
    }
    // No password: the account logs in through its provider only.
    accounts
        .create_user(&candidate, None, false, false)
        .map_err(SsoFailure::internal)?;
    crate::service::profile_defaults(services, &candidate).map_err(SsoFailure::internal)?;
    if let Some(name) = claims
        .get(&conf.displayname_claim)
        .and_then(Value::as_str)
        .map(|n| n.trim().chars().take(256).collect::<String>())
        .filter(|n| !n.is_empty())
    {
        services
            .profiles
            .set(&candidate, "displayname", Some(&Value::String(name)))
            .map_err(SsoFailure::internal)?;
    }
    link(services, idp, subject, &candidate).map_err(SsoFailure::internal)?;
    Ok(candidate)
}

/// A deactivated account does not log in (a locked one does, and is refused at every request
/// as after a password login).
fn ensure_active(services: &Services, user: &UserId) -> Result<(), SsoFailure> {
    match services.accounts.user(user).map_err(SsoFailure::internal)? {
        Some(u) if u.deactivated => Err(SsoFailure::forbidden(
            "deactivated",
            "This account has been deactivated",
        )),
        Some(_) => Ok(()),
        // The link outlived its account (should not happen): refuse rather than recreate.
        None => Err(SsoFailure::forbidden(
            "unknown_user",
            "This account does not exist",
        )),
    }
}

/// Property tests: any claim gives a valid localpart or none.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, text};

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn fuzz_localparts_from_claims(claim in text()) {
            if let Some(l) = sanitize_localpart(&claim) {
                prop_assert!(!l.is_empty() && l.chars().count() <= 64);
                prop_assert!(l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._=-/+".contains(c)));
                let id = format!("@{l}:example.org");
                prop_assert!(UserId::parse(id).is_ok());
            }
        }
    }
}
