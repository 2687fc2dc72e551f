//! Export of a user's data (GDPR Art. 15 and 20, REQUIREMENTS.md A7): one tar archive with
//!
//! - `manifest.json`: profile, account data, devices (no tokens), room memberships, E2EE key
//!   backup metadata (versions, not the keys), cross-signing public keys, the audit entries about
//!   the user, the list of media and which event files hold which room;
//! - `events/<n>-<chunk>.jsonl`: every timeline event the user sent, as stored (one per line),
//!   written out every few MiB; rooms the user forgot are included (found through their
//!   membership history, marked `"forgotten": true` in the manifest);
//! - `media/<server>/<media id>`: the files they uploaded.
//!
//! The archive is produced while it is sent: memory holds at most one chunk of events or one
//! media read buffer, whatever the size of the export.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use ruma::UserId;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::{
    error::{Error, Result},
    service::Services,
    storage::{keys, Table},
    utils,
};

/// Events per `events/*.jsonl` file (bounds the memory one file takes).
pub const EVENTS_PER_CHUNK: usize = 500;
/// Bytes after which an events file is written out.
const CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Most timeline entries looked at per room.
const MAX_TIMELINE_SCAN: usize = 5_000_000;
/// Most audit entries exported.
const MAX_AUDIT: usize = 1_000_000;

/// The archive as a stream of byte chunks, produced by a task as the receiver reads.
pub fn archive(services: Arc<Services>, user: ruma::OwnedUserId) -> mpsc::Receiver<Result<Bytes>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        if let Err(e) = write_archive(&services, &user, &tx).await {
            tracing::warn!(%user, error = %e, "export failed");
            let _ = tx.send(Err(e)).await;
        }
    });
    rx
}

fn header(path: &str, size: u64) -> Result<Bytes> {
    let mut h = tar::Header::new_gnu();
    h.set_path(path)
        .map_err(|e| Error::internal(format!("tar path {path}: {e}")))?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(utils::now_ms() / 1000);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(Bytes::copy_from_slice(h.as_bytes()))
}

fn padding(size: u64) -> Bytes {
    let rest = (size % 512) as usize;
    if rest == 0 {
        Bytes::new()
    } else {
        Bytes::from(vec![0u8; 512 - rest])
    }
}

async fn send(tx: &mpsc::Sender<Result<Bytes>>, b: Bytes) -> Result<()> {
    if b.is_empty() {
        return Ok(());
    }
    tx.send(Ok(b))
        .await
        .map_err(|_| Error::internal("export receiver gone"))
}

async fn send_file(tx: &mpsc::Sender<Result<Bytes>>, path: &str, data: Vec<u8>) -> Result<()> {
    let len = data.len() as u64;
    send(tx, header(path, len)?).await?;
    send(tx, Bytes::from(data)).await?;
    send(tx, padding(len)).await
}

async fn write_archive(
    s: &Services,
    user: &UserId,
    tx: &mpsc::Sender<Result<Bytes>>,
) -> Result<()> {
    let mut rooms_out = Vec::new();
    let mut event_files = Vec::new();
    // The rooms in the user's room list, then those they forgot (found through their
    // membership history), with their last membership there.
    let rooms = s
        .rooms
        .user_rooms(user)?
        .into_iter()
        .map(|(id, room)| (id, room.membership, false))
        .chain(
            crate::policy::erasure::forgotten_rooms(s, user)?
                .into_iter()
                .map(|(id, membership)| (id, membership, true)),
        );
    for (n, (room_id, membership, forgotten)) in rooms.enumerate() {
        let mut room_out = json!({ "room_id": room_id, "membership": membership });
        if forgotten {
            room_out["forgotten"] = json!(true);
        }
        rooms_out.push(room_out);
        // Events of this room the user sent, in stream order, in chunks.
        let prefix = keys::prefix(&[room_id.as_str()]);
        let mut chunk = Vec::new();
        let mut chunk_no = 0usize;
        let mut ids = Vec::new();
        for entry in s
            .storage
            .scan_prefix(Table::Timeline, &prefix)?
            .take(MAX_TIMELINE_SCAN)
        {
            let (_, v) = entry?;
            ids.push(v);
            if ids.len() < EVENTS_PER_CHUNK {
                continue;
            }
            collect_sent(s, user, &std::mem::take(&mut ids), &mut chunk)?;
            if chunk.len() >= CHUNK_BYTES {
                let path = format!("events/{n}-{chunk_no}.jsonl");
                event_files.push(json!({ "path": path, "room_id": room_id }));
                send_file(tx, &path, std::mem::take(&mut chunk)).await?;
                chunk_no += 1;
            }
        }
        collect_sent(s, user, &ids, &mut chunk)?;
        if !chunk.is_empty() {
            let path = format!("events/{n}-{chunk_no}.jsonl");
            event_files.push(json!({ "path": path, "room_id": room_id }));
            send_file(tx, &path, chunk).await?;
        }
    }

    // Media files, streamed from the store.
    let mut media_out = Vec::new();
    for m in s.media.user_media(user.as_str())? {
        let mut item = json!({
            "mxc": format!("mxc://{}/{}", m.server, m.media_id),
            "created_ts": m.record.created_ts,
        });
        if let Some(file) = &m.record.file {
            item["content_type"] = json!(file.content_type);
            item["filename"] = json!(file.filename);
            item["size"] = json!(file.size);
            item["uploaded_ts"] = json!(file.uploaded_ts);
            let path = format!("media/{}/{}", m.server, m.media_id);
            // The size recorded at upload is the plaintext size, whether the file is stored
            // encrypted or not; the tar header needs it before the bytes.
            if let Ok(mut bytes) = s.media.files().open_stream(&file.sha256).await {
                let len = file.size;
                send(tx, header(&path, len)?).await?;
                let mut left = len;
                while left > 0 {
                    let chunk = match bytes.next().await {
                        Some(chunk) => {
                            chunk.map_err(|e| Error::internal(format!("media read: {e}")))?
                        }
                        None => return Err(Error::internal("media file shrank during export")),
                    };
                    if chunk.len() as u64 > left {
                        return Err(Error::internal("media file grew during export"));
                    }
                    left -= chunk.len() as u64;
                    send(tx, chunk).await?;
                }
                send(tx, padding(len)).await?;
                item["path"] = json!(path);
            }
        }
        media_out.push(item);
    }

    let manifest = manifest(s, user, rooms_out, event_files, media_out)?;
    send_file(tx, "manifest.json", serde_json::to_vec_pretty(&manifest)?).await?;
    // End of archive: two zero blocks.
    send(tx, Bytes::from(vec![0u8; 1024])).await
}

/// Append the events among `ids` that `user` sent, one JSON line each, as stored.
fn collect_sent(s: &Services, user: &UserId, ids: &[Box<[u8]>], out: &mut Vec<u8>) -> Result<()> {
    for id in ids {
        let Some(raw) = s.storage.get(Table::Pdus, id)? else {
            continue;
        };
        let v: Value = serde_json::from_slice(&raw)?;
        if v.get("sender").and_then(Value::as_str) != Some(user.as_str()) {
            continue;
        }
        serde_json::to_writer(&mut *out, &v)?;
        out.push(b'\n');
    }
    Ok(())
}

fn manifest(
    s: &Services,
    user: &UserId,
    rooms: Vec<Value>,
    event_files: Vec<Value>,
    media: Vec<Value>,
) -> Result<Value> {
    let record = s.accounts.user(user)?;
    let devices: Vec<Value> = s
        .accounts
        .devices(user)?
        .into_iter()
        .map(|d| {
            // Never the token hashes.
            json!({
                "device_id": d.device_id,
                "display_name": d.display_name,
                "last_seen_ip": d.last_seen_ip,
                "last_seen_ts": d.last_seen_ts,
                "keys": s.keys.device_keys(user, &d.device_id).ok().flatten(),
            })
        })
        .collect();
    let account_data: Vec<Value> = s
        .account_data
        .all(user)?
        .into_iter()
        .map(|(room, kind, content)| json!({ "room_id": room, "type": kind, "content": content }))
        .collect();
    let prefix = keys::prefix(&[user.as_str()]);
    let mut backup_versions = Vec::new();
    for entry in s
        .storage
        .scan_prefix(Table::BackupVersions, &prefix)?
        .take(10_000)
    {
        let (k, v) = entry?;
        let mut v: Value = serde_json::from_slice(&v).unwrap_or(Value::Null);
        if let Some(o) = v.as_object_mut() {
            o.insert("version".into(), json!(keys::count_suffix(&k)));
        }
        backup_versions.push(v);
    }
    let mut cross_signing = serde_json::Map::new();
    for entry in s
        .storage
        .scan_prefix(Table::CrossSigningKeys, &prefix)?
        .take(16)
    {
        let (k, v) = entry?;
        let kind = keys::last_part(&k).unwrap_or("").to_owned();
        cross_signing.insert(kind, serde_json::from_slice(&v).unwrap_or(Value::Null));
    }
    let mut audit = Vec::new();
    for entry in s
        .storage
        .scan_prefix(Table::AuditByUser, &prefix)?
        .take(MAX_AUDIT)
    {
        let (k, _) = entry?;
        if let Some(bytes) = s.storage.get(Table::AuditLog, &k[prefix.len()..])? {
            audit.push(serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null));
        }
    }
    Ok(json!({
        "format": "hafen-export/1",
        "user_id": user,
        "exported_ts": utils::now_ms(),
        "account": record.map(|r| json!({
            "created_ts": r.created_ms,
            "admin": r.admin,
            "deactivated": r.deactivated,
            "guest": r.guest,
            "locked": r.locked,
            "suspended": r.suspended,
        })),
        "profile": s.profiles.all(user)?,
        "account_data": account_data,
        "devices": devices,
        "cross_signing_keys": cross_signing,
        "key_backup_versions": backup_versions,
        "rooms": rooms,
        "event_files": event_files,
        "media": media,
        "audit": audit,
        "identity_provider": super::claims::get(&s.storage, user)?,
    }))
}
