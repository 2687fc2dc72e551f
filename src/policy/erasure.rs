//! Erasure of a user (GDPR Art. 17, REQUIREMENTS.md A6): deactivation with `erase: true`.
//!
//! In the order that keeps the rooms working and the remote copies in step:
//! 1. their display name and avatar are removed (new membership events without them); the
//!    local aliases they created are deleted (and dropped from the canonical alias event where
//!    they may still send one); then
//!    every message the user sent, and each of their superseded membership events, in a room
//!    they are still joined to is redacted by a real
//!    `m.room.redaction` sent as the user (the auth rules let a member redact their own events),
//!    through the normal write path, so the rooms' other servers redact their copies too; in rooms
//!    they already left, and in rooms they forgot (found through their membership history), the
//!    local copy is stripped the same way (no event can be sent there);
//! 2. the account is deactivated: it leaves every room, all devices and their tokens, device
//!    keys, one-time and fallback keys and pushers go;
//! 3. profile, account data (push rules are account data), filters, cross-signing keys,
//!    signatures, key backups, to-device messages, notifications, presence and dehydrated device
//!    are deleted; their media rows and files (unless another media id uses the same file);
//!    their read receipts (and receipt log rows) in every room they were ever in, their OpenID
//!    tokens and the signatures they made on other users' keys are deleted; in the reports they
//!    filed (or that name them) their id becomes the pseudonym below, the report stays;
//! 4. the audit entries about the user are pseudonymized: the user id is replaced by a keyed hash
//!    (`utils::keyed_hash` with the audit log's secret), so the log stays consistent without
//!    naming the person;
//! 5. the database is flushed and compacted, so the removed bytes are physically gone.

use ruma::{RoomId, UserId};
use serde_json::Value;

use crate::{
    error::Result,
    policy::audit::AuditEntry,
    service::{rooms::NewEvent, Services},
    storage::{keys, Table},
    utils,
};

/// Most timeline entries looked at per room when collecting a user's events.
const MAX_TIMELINE_SCAN: usize = 5_000_000;
/// Most rows deleted per table and user.
const MAX_ROWS: usize = 10_000_000;

/// What an erasure did (the admin API answers with it, the audit log records it).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ErasureSummary {
    pub redacted_events: usize,
    pub stripped_events: usize,
    /// Of the stripped events, those in rooms the user had forgotten.
    pub forgotten_room_events: usize,
    pub media_deleted: usize,
    pub audit_entries_pseudonymized: usize,
    pub receipts_deleted: usize,
    pub reports_pseudonymized: usize,
    pub openid_tokens_deleted: usize,
    pub key_signatures_deleted: usize,
    pub aliases_deleted: usize,
}

/// Every room the user ever had a membership in, with their last membership there, read from
/// their membership history (`membership_log`: `user 0xff room 0xff count`), which outlives
/// forgetting a room (forgetting only drops the room from their room list).
pub fn rooms_ever(
    services: &Services,
    user: &UserId,
) -> Result<std::collections::BTreeMap<ruma::OwnedRoomId, String>> {
    let prefix = keys::prefix(&[user.as_str()]);
    let mut out = std::collections::BTreeMap::new();
    for entry in services
        .storage
        .scan_prefix(Table::MembershipLog, &prefix)?
        .take(MAX_ROWS)
    {
        let (k, v) = entry?;
        // The room is the part between the user and the count (the count's bytes may hold 0xff
        // too, so only the second part is taken).
        let Some(room) = keys::split(&k).get(1).and_then(|r| RoomId::parse(*r).ok()) else {
            continue;
        };
        // Rows come in count order within a room: the last one wins.
        out.insert(room, String::from_utf8_lossy(&v).into_owned());
    }
    Ok(out)
}

/// The rooms the user has forgotten: in their membership history, not in their room list.
pub fn forgotten_rooms(
    services: &Services,
    user: &UserId,
) -> Result<Vec<(ruma::OwnedRoomId, String)>> {
    let listed: std::collections::HashSet<ruma::OwnedRoomId> = services
        .rooms
        .user_rooms(user)?
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    Ok(rooms_ever(services, user)?
        .into_iter()
        .filter(|(r, _)| !listed.contains(r))
        .collect())
}

/// The pseudonym that replaces `user` in the audit log.
pub fn pseudonym(services: &Services, user: &UserId) -> String {
    format!(
        "erased:{}",
        utils::keyed_hash(&services.audit.hash_key(), user.as_str().as_bytes())
    )
}

/// The events `user` sent in `room` that still carry content worth removing: their messages
/// (not redactions, not already redacted) and their superseded membership events (which carry
/// their display name and avatar of the time; redaction keeps the membership the auth rules
/// need). Other state (names, topics, power levels) belongs to the room and stays; so does the
/// current membership event.
fn user_events(
    services: &Services,
    room: &RoomId,
    user: &UserId,
) -> Result<Vec<ruma::OwnedEventId>> {
    let current_member = services
        .rooms
        .state_event_id(room, "m.room.member", user.as_str())?;
    let prefix = keys::prefix(&[room.as_str()]);
    let mut out = Vec::new();
    for entry in services
        .storage
        .scan_prefix(Table::Timeline, &prefix)?
        .take(MAX_TIMELINE_SCAN)
    {
        let (_, v) = entry?;
        let id = String::from_utf8_lossy(&v);
        let Some(pdu) = services.rooms.pdu(&id)? else {
            continue;
        };
        let own_old_membership = pdu.kind == ruma::events::TimelineEventType::RoomMember
            && pdu.state_key.as_deref() == Some(user.as_str())
            && current_member.as_deref() != Some(&*pdu.event_id);
        if pdu.sender != user
            || (pdu.state_key.is_some() && !own_old_membership)
            || pdu.kind == ruma::events::TimelineEventType::RoomRedaction
            || pdu
                .unsigned
                .as_ref()
                .is_some_and(|u| u.contains_key("redacted_because"))
        {
            continue;
        }
        // Already stripped by an earlier erasure: nothing left.
        if pdu.content.get() == "{}" {
            continue;
        }
        // A membership event that never carried more than the membership has nothing to hide.
        if own_old_membership {
            let content: serde_json::Map<String, Value> =
                serde_json::from_str(pdu.content.get()).unwrap_or_default();
            if content.keys().all(|k| k == "membership") {
                continue;
            }
        }
        out.push(pdu.event_id);
    }
    Ok(out)
}

/// Deactivate `user`; with `erase`, erase their data as described above.
pub async fn deactivate(
    services: &Services,
    user: &UserId,
    erase: bool,
) -> Result<Option<ErasureSummary>> {
    if !erase {
        crate::service::accounts::deactivate_account(services, user).await?;
        return Ok(None);
    }
    let mut summary = ErasureSummary::default();
    // Display name and avatar first: every joined room gets a membership event without them, so
    // the older ones (which carry them) are superseded and redacted below.
    for field in ["displayname", "avatar_url"] {
        if services.profiles.get(user, field)?.is_some() {
            if let Err(e) = crate::service::profile::set_field(services, user, field, None).await {
                tracing::warn!(%user, field, error = %e, "could not clear profile field while erasing");
            }
        }
    }
    // Aliases first, while the user may still be allowed to update the canonical alias event.
    summary.aliases_deleted = services
        .rooms
        .remove_aliases_created_by(user, MAX_ROWS)
        .await?
        .len();
    let forgotten = forgotten_rooms(services, user)?;
    let rooms = services
        .rooms
        .user_rooms(user)?
        .into_iter()
        .map(|(id, room)| (id, room.membership == "join", false))
        .chain(forgotten.into_iter().map(|(id, _)| (id, false, true)));
    for (room_id, joined, was_forgotten) in rooms {
        let events = user_events(services, &room_id, user)?;
        for event_id in events {
            if joined {
                let redaction = NewEvent {
                    kind: ruma::events::TimelineEventType::RoomRedaction,
                    content: serde_json::json!({ "reason": "erased at the user's request" }),
                    state_key: None,
                    redacts: Some(event_id.clone()),
                    origin_server_ts: None,
                };
                match services.rooms.append(&room_id, user, redaction, None).await {
                    Ok(_) => {
                        summary.redacted_events += 1;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(%room_id, %event_id, error = %e, "redaction refused while erasing; stripping locally");
                    }
                }
            }
            services.rooms.erase_stored(&room_id, &event_id).await?;
            summary.stripped_events += 1;
            if was_forgotten {
                summary.forgotten_room_events += 1;
            }
        }
    }

    crate::service::accounts::deactivate_account(services, user).await?;

    delete_user_rows(services, user)?;
    for room_id in rooms_ever(services, user)?.keys() {
        summary.receipts_deleted += services.receipts.erase_user(room_id, user, MAX_ROWS)?;
    }
    let (reports, tokens) =
        services
            .reports
            .erase_user(user.as_str(), &pseudonym(services, user), MAX_ROWS)?;
    summary.reports_pseudonymized = reports;
    summary.openid_tokens_deleted = tokens;
    summary.key_signatures_deleted = services.keys.remove_signatures_by(user, MAX_ROWS)?;
    summary.media_deleted = services.media.delete_user_media(user.as_str()).await?;
    summary.audit_entries_pseudonymized = pseudonymize_audit(services, user)?;
    services.audit.record(AuditEntry {
        kind: "erasure".to_owned(),
        user: Some(pseudonym(services, user)),
        detail: serde_json::to_value(&summary)?,
        ..AuditEntry::default()
    })?;

    let storage = services.storage.clone();
    tokio::task::spawn_blocking(move || storage.compact_all())
        .await
        .map_err(|e| crate::error::Error::internal(format!("compaction task: {e}")))??;
    Ok(Some(summary))
}

/// Delete every row keyed by the user in the per-user tables.
fn delete_user_rows(services: &Services, user: &UserId) -> Result<()> {
    const PER_USER: &[Table] = &[
        Table::AccountData,
        Table::AccountDataLog,
        Table::Filters,
        Table::Profile,
        Table::Devices,
        Table::DeviceKeys,
        Table::OneTimeKeys,
        Table::OneTimeKeyCounts,
        Table::FallbackKeys,
        Table::CrossSigningKeys,
        Table::KeySignatures,
        Table::ToDevice,
        Table::BackupVersions,
        Table::BackupKeys,
        Table::Notifications,
        Table::PushUnread,
        Table::Pushers,
        Table::Transactions,
    ];
    let prefix = keys::prefix(&[user.as_str()]);
    for table in PER_USER {
        let rows: Vec<Box<[u8]>> = services
            .storage
            .scan_prefix(*table, &prefix)?
            .take(MAX_ROWS)
            .map(|e| e.map(|(k, _)| k))
            .collect::<Result<_>>()?;
        for chunk in rows.chunks(10_000) {
            let mut batch = services.storage.batch();
            for k in chunk {
                batch.delete(*table, k)?;
            }
            batch.commit()?;
        }
    }
    let mut batch = services.storage.batch();
    batch.delete(Table::Presence, user.as_bytes())?;
    batch.delete(Table::DehydratedDevices, user.as_bytes())?;
    batch.delete(Table::BackupVersions, &keys::join(&["next", user.as_str()]))?;
    batch.commit()?;
    // The identity provider's links to the account and the groups it named.
    crate::service::sso::mapping::unlink_user(services, user)
}

/// Replace the user id by its pseudonym in every audit entry about the user (and in the
/// index), returning how many entries changed.
fn pseudonymize_audit(services: &Services, user: &UserId) -> Result<usize> {
    let alias = pseudonym(services, user);
    let prefix = keys::prefix(&[user.as_str()]);
    let index: Vec<Box<[u8]>> = services
        .storage
        .scan_prefix(Table::AuditByUser, &prefix)?
        .take(MAX_ROWS)
        .map(|e| e.map(|(k, _)| k))
        .collect::<Result<_>>()?;
    let mut done = 0;
    for chunk in index.chunks(1_000) {
        let mut batch = services.storage.batch();
        for k in chunk {
            let entry_key = &k[prefix.len()..];
            batch.delete(Table::AuditByUser, k)?;
            let mut new_key = keys::prefix(&[&alias]);
            new_key.extend_from_slice(entry_key);
            batch.put(Table::AuditByUser, &new_key, b"")?;
            let Some(bytes) = services.storage.get(Table::AuditLog, entry_key)? else {
                continue;
            };
            // Every mention of the user id (in `user`, `detail`, ...) becomes the pseudonym.
            let mut entry: Value = serde_json::from_slice(&bytes)?;
            replace_strings(&mut entry, user.as_str(), &alias, 0);
            batch.put(Table::AuditLog, entry_key, &serde_json::to_vec(&entry)?)?;
            done += 1;
        }
        batch.commit()?;
    }
    Ok(done)
}

/// Replace every string equal to `from` (or a `from` inside a longer string, such as a path)
/// by `to`, down to a bounded depth.
fn replace_strings(v: &mut Value, from: &str, to: &str, depth: usize) {
    if depth > 32 {
        return;
    }
    match v {
        Value::String(s) if s.contains(from) => *s = s.replace(from, to),
        Value::Array(a) => a
            .iter_mut()
            .for_each(|x| replace_strings(x, from, to, depth + 1)),
        Value::Object(o) => o
            .values_mut()
            .for_each(|x| replace_strings(x, from, to, depth + 1)),
        _ => {}
    }
}
