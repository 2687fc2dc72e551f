//! Consent to the privacy notice (REQUIREMENTS.md A1) after registration: when the operator
//! publishes a new version (or configures a notice for a server that already has users), every
//! user who has not accepted the current version is asked again. Their actions that put data
//! into rooms (send, join, invite, create rooms, profile changes, uploads) get 403
//! `M_CONSENT_NOT_GIVEN` with a `consent_uri`, which Element shows as a "review terms" dialog.
//!
//! The `consent_uri` is a page of this server (`/_hafen/consent`) that the user opens in a
//! browser, without their access token: the link carries the user id and an HMAC of it under a
//! server secret, so only the user the server sent it to can accept in their name. Clients can
//! also accept with `POST /_hafen/client/v1/privacy_notice/accept` and the user's token.

use ruma::UserId;

use super::audit::AuditEntry;
use crate::{
    error::{Error, Result},
    service::Services,
    storage::Storage,
    utils,
};

/// The `global` row of the secret consent links are signed with.
const LINK_KEY_ROW: &[u8] = b"consent_link_key";

/// The URI where `user` accepts the current notice, when they must and have not yet.
pub fn pending_uri(s: &Services, user: &UserId, accepted: Option<&str>) -> Option<String> {
    let notice = s.config.privacy_notice.as_ref()?;
    if !notice.block_until_accepted || accepted == Some(notice.version.as_str()) {
        return None;
    }
    Some(consent_uri(s, user))
}

/// The link code: for this user and this version of the notice (a link to an older version
/// does not accept a newer one).
fn link_mac(storage: &Storage, user: &str, version: &str) -> String {
    utils::keyed_hash(
        &super::stored_secret(storage, LINK_KEY_ROW),
        format!("{user}\n{version}").as_bytes(),
    )
}

fn current_version(s: &Services) -> &str {
    s.config
        .privacy_notice
        .as_ref()
        .map_or("", |n| n.version.as_str())
}

/// The page of this server where `user` accepts the notice.
pub fn consent_uri(s: &Services, user: &UserId) -> String {
    let base = s
        .config
        .public_baseurl
        .clone()
        .or_else(|| s.config.well_known.client.clone())
        .unwrap_or_else(|| format!("https://{}", s.config.server_name));
    let mut url = format!("{}/_hafen/consent?", base.trim_end_matches('/'));
    url.push_str(
        &url::form_urlencoded::Serializer::new(String::new())
            .append_pair("u", user.as_str())
            .append_pair(
                "h",
                &link_mac(&s.storage, user.as_str(), current_version(s)),
            )
            .finish(),
    );
    url
}

/// Is `mac` the link code of `user`? (Compared in constant time.)
pub fn link_is_valid(s: &Services, user: &str, mac: &str) -> bool {
    let expected = link_mac(&s.storage, user, current_version(s));
    expected.len() == mac.len()
        && expected
            .bytes()
            .zip(mac.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Record that `user` accepted `version`, which must be the current one.
pub fn accept(s: &Services, user: &UserId, version: &str) -> Result<()> {
    let notice = s
        .config
        .privacy_notice
        .as_ref()
        .ok_or_else(|| Error::not_found("No privacy notice is configured"))?;
    if version != notice.version {
        return Err(Error::invalid_param(format!(
            "The current privacy notice is version {}",
            notice.version
        )));
    }
    s.accounts.set_privacy_notice_accepted(user, version)?;
    s.audit.record(AuditEntry {
        kind: "privacy_notice_accepted".to_owned(),
        user: Some(user.to_string()),
        detail: serde_json::json!({ "version": version, "via": "consent" }),
        ..AuditEntry::default()
    })
}
