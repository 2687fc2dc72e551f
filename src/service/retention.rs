//! Retention that deletes (D4, A6): the purge job, the admin purge of a room's history and
//! the deletion of a whole room.
//!
//! The job runs every `retention.purge_interval` (a supervised task started with the server; it
//! ends when the services are dropped) and can be called directly ([`purge_expired`]). For each
//! room it asks the policy layer for the effective lifetime (`m.room.retention` clamped by the
//! config), purges the message events older than that (`Rooms::purge_history`), deletes media
//! past `media_retention`, finishes room deletions a crash interrupted, and then makes it
//! physical: memtables flushed (old write-ahead logs deleted) and the touched tables compacted
//! (old SST versions dropped), so the content is in no file of the database directory.
//!
//! Admin purges and room deletions run as background tasks with an id (Synapse's `purge_id`,
//! `delete_id`); their status is kept in memory, as Synapse does.

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
    time::Duration,
};

use parking_lot::Mutex;
use ruma::{OwnedRoomId, RoomId};
use serde::Serialize;
use serde_json::{json, Value};

use super::{
    rooms::purge::{PurgeScope, PURGED_TABLES},
    Services,
};
use crate::{
    error::{Error, Result},
    storage::{keys, Table},
    utils,
};

/// Events one room gives up per call of the purge (the next run continues).
const MAX_EVENTS_PER_ROOM: usize = 100_000;
/// Rooms one run looks at.
const MAX_ROOMS: usize = 1_000_000;
/// Statuses kept in memory (oldest dropped first).
const MAX_TASKS: usize = 1000;
/// `Global` key prefix of a room whose deletion started and has not finished.
const DELETING: &str = "deleting_room";

/// One admin purge or room deletion.
#[derive(Clone, Debug, Serialize)]
pub struct Task {
    #[serde(skip)]
    pub room_id: OwnedRoomId,
    #[serde(skip)]
    pub created: u64,
    /// Purge: `active`, `complete`, `failed`; deletion: `shutting_down`, `purging`,
    /// `complete`, `failed`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A deletion's `shutdown_room` result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_room: Option<Value>,
}

/// What one run of the job did.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunReport {
    pub rooms: usize,
    pub events: usize,
    pub media: usize,
}

#[derive(Default)]
pub struct Retention {
    tasks: Mutex<HashMap<String, Task>>,
    /// One purge (job, admin purge or deletion) writes and compacts at a time.
    running: tokio::sync::Mutex<()>,
}

impl Retention {
    pub fn task(&self, id: &str) -> Option<Task> {
        self.tasks.lock().get(id).cloned()
    }

    /// The deletion tasks of a room, with their ids.
    pub fn tasks_of_room(&self, room_id: &RoomId) -> Vec<(String, Task)> {
        let mut out: Vec<(String, Task)> = self
            .tasks
            .lock()
            .iter()
            .filter(|(_, t)| t.room_id == room_id && t.shutdown_room.is_some())
            .map(|(id, t)| (id.clone(), t.clone()))
            .collect();
        out.sort_by_key(|(_, t)| t.created);
        out
    }

    fn set(&self, id: &str, task: Task) {
        let mut tasks = self.tasks.lock();
        if tasks.len() >= MAX_TASKS && !tasks.contains_key(id) {
            if let Some(oldest) = tasks
                .iter()
                .min_by_key(|(_, t)| t.created)
                .map(|(k, _)| k.clone())
            {
                tasks.remove(&oldest);
            }
        }
        tasks.insert(id.to_owned(), task);
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Task)) {
        if let Some(t) = self.tasks.lock().get_mut(id) {
            f(t);
        }
    }
}

/// The effective lifetime (ms) of a room's messages, from its `m.room.retention` and the config.
pub fn room_lifetime(services: &Services, room_id: &RoomId) -> Result<Option<u64>> {
    let content = services
        .rooms
        .state_get(room_id, "m.room.retention", "")?
        .map(|p| p.content_value());
    Ok(services
        .policy
        .retention
        .effective_max_lifetime(content.as_ref()))
}

/// Make what was deleted so far physical (flush, compact `tables`, flush), off the runtime.
pub async fn erase_physically(services: &Services, tables: &'static [Table]) -> Result<()> {
    let storage = services.storage.clone();
    tokio::task::spawn_blocking(move || storage.erase_deleted(tables))
        .await
        .map_err(|e| Error::internal(format!("compaction task: {e}")))?
}

/// One run of the purge job as of `now` (ms): expired messages of every room, expired media,
/// unfinished room deletions; then the physical deletion.
pub async fn purge_expired(services: &Services, now: u64) -> Result<RunReport> {
    let _running = services.retention.running.lock().await;
    let mut report = RunReport::default();
    let mut deleted_rooms = false;
    for room_id in pending_deletions(services)? {
        finish_deletion(services, &room_id).await?;
        deleted_rooms = true;
    }
    for room_id in services.rooms.room_ids(MAX_ROOMS)? {
        let Some(lifetime) = room_lifetime(services, &room_id)? else {
            continue;
        };
        let scope = PurgeScope {
            before_ts: Some(now.saturating_sub(lifetime)),
            ..PurgeScope::default()
        };
        match services
            .rooms
            .purge_history(&room_id, &scope, MAX_EVENTS_PER_ROOM)
            .await
        {
            Ok(outcome) if outcome.purged > 0 => {
                report.rooms += 1;
                report.events += outcome.purged;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(%room_id, error = %e, "retention purge of a room failed"),
        }
    }
    let media = &services.config.media_retention;
    report.media = services
        .media
        .purge_expired(now, media.local_max_lifetime, media.remote_max_lifetime)
        .await?;
    if deleted_rooms {
        let storage = services.storage.clone();
        tokio::task::spawn_blocking(move || storage.compact_all())
            .await
            .map_err(|e| Error::internal(format!("compaction task: {e}")))??;
    } else if report.events > 0 || report.media > 0 {
        erase_physically(services, PURGED_TABLES).await?;
    }
    if report.events > 0 || report.media > 0 {
        tracing::info!(
            rooms = report.rooms,
            events = report.events,
            media = report.media,
            "retention purge"
        );
    }
    Ok(report)
}

/// The job: every `retention.purge_interval`, until the services are gone.
pub async fn run(services: Weak<Services>) {
    loop {
        let interval = match services.upgrade() {
            Some(s) => s.config.retention.purge_interval,
            None => return,
        };
        tokio::time::sleep(Duration::from_millis(interval.max(1000))).await;
        let Some(s) = services.upgrade() else { return };
        if let Err(e) = purge_expired(&s, utils::now_ms()).await {
            tracing::error!(error = %e, "retention purge failed");
        }
    }
}

/// Purge a room's history in `scope` completely and make it physical; returns the events purged.
pub async fn purge_history(
    services: &Services,
    room_id: &RoomId,
    scope: &PurgeScope,
) -> Result<usize> {
    let _running = services.retention.running.lock().await;
    let mut purged = 0;
    // Bounded: each round purges up to the budget or finishes.
    for _ in 0..1000 {
        let outcome = services
            .rooms
            .purge_history(room_id, scope, MAX_EVENTS_PER_ROOM)
            .await?;
        purged += outcome.purged;
        if !outcome.more {
            break;
        }
    }
    erase_physically(services, PURGED_TABLES).await?;
    Ok(purged)
}

/// Start an admin purge in the background; its id for `purge_history_status`.
pub fn start_purge_history(
    services: &Arc<Services>,
    room_id: &RoomId,
    scope: PurgeScope,
) -> String {
    let id = utils::random_string(16);
    services.retention.set(
        &id,
        Task {
            room_id: room_id.to_owned(),
            created: utils::now_ms(),
            status: "active".into(),
            error: None,
            shutdown_room: None,
        },
    );
    let weak = Arc::downgrade(services);
    let room_id = room_id.to_owned();
    let task_id = id.clone();
    tokio::spawn(async move {
        let Some(s) = weak.upgrade() else { return };
        let result = purge_history(&s, &room_id, &scope).await;
        s.retention.update(&task_id, |t| match result {
            Ok(n) => {
                tracing::info!(%room_id, events = n, "admin purge of room history");
                t.status = "complete".into();
            }
            Err(e) => {
                t.status = "failed".into();
                t.error = Some(e.to_string());
            }
        });
    });
    id
}

/// Delete a whole room: local members leave (their leave events go to the other servers in the
/// room), then every row of the room goes from every table, then the database is compacted.
/// Returns Synapse's `shutdown_room` result.
pub async fn delete_room(
    services: &Services,
    room_id: &RoomId,
    task_id: Option<&str>,
    purge: bool,
) -> Result<Value> {
    if !services.rooms.exists(room_id)? {
        return Err(Error::not_found("Unknown room"));
    }
    let _running = services.retention.running.lock().await;
    let local_aliases: Vec<String> = services
        .rooms
        .local_aliases(room_id)?
        .into_iter()
        .map(|a| a.to_string())
        .collect();
    let mut kicked = Vec::new();
    let mut failed = Vec::new();
    let server = services.globals.server_name.clone();
    let members = services
        .rooms
        .members_with(room_id, |m| matches!(m, "join" | "invite" | "knock"))?;
    let remote_servers =
        crate::service::federation::sender::servers_in_room(&services.rooms, room_id, &server)?;
    for user in members.into_iter().filter(|u| u.server_name() == server) {
        match services
            .rooms
            .leave_room(
                room_id,
                &user,
                Some("This room has been deleted by an administrator"),
            )
            .await
        {
            Ok(()) => kicked.push(user.to_string()),
            Err(e) => {
                tracing::warn!(%room_id, %user, error = %e, "could not make a user leave a deleted room");
                failed.push(user.to_string());
            }
        }
    }
    let result = json!({
        "kicked_users": kicked,
        "failed_to_kick_users": failed,
        "local_aliases": local_aliases,
        "new_room_id": null,
    });
    if !purge {
        return Ok(result);
    }
    // The leave events must reach the other servers in the room before their rows go: the
    // sender drops queue items whose event is gone.
    wait_for_delivery(
        services,
        &remote_servers,
        services.globals.counter.watermark(),
    )
    .await;
    if let Some(id) = task_id {
        services
            .retention
            .update(id, |t| t.status = "purging".into());
    }
    // The deletion is recorded first, so a crash part-way is finished by the next job run.
    let marker = keys::join(&[DELETING, room_id.as_str()]);
    services.storage.put(Table::Global, &marker, b"")?;
    finish_deletion(services, room_id).await?;
    let storage = services.storage.clone();
    tokio::task::spawn_blocking(move || storage.compact_all())
        .await
        .map_err(|e| Error::internal(format!("compaction task: {e}")))??;
    Ok(result)
}

/// How long a room deletion waits for its leave events to reach the other servers.
const LEAVE_DELIVERY_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Wait (at most [`LEAVE_DELIVERY_WAIT`]) until every server in `servers` received the events up
/// to stream count `upto`; servers that did not by then are logged and miss them.
async fn wait_for_delivery(
    services: &Services,
    servers: &std::collections::BTreeSet<ruma::OwnedServerName>,
    upto: u64,
) {
    let deadline = tokio::time::Instant::now() + LEAVE_DELIVERY_WAIT;
    let mut waiting: Vec<&ruma::OwnedServerName> = servers.iter().collect();
    loop {
        waiting.retain(|s| {
            services
                .federation
                .sender
                .pdus_pending_up_to(s, upto)
                .unwrap_or(false)
        });
        if waiting.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(servers = ?waiting, "room deletion: the leave events did not reach these servers in time");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Start a room deletion in the background; its id for `delete_status`.
pub fn start_delete_room(services: &Arc<Services>, room_id: &RoomId, purge: bool) -> String {
    let id = utils::random_string(16);
    services.retention.set(
        &id,
        Task {
            room_id: room_id.to_owned(),
            created: utils::now_ms(),
            status: "shutting_down".into(),
            error: None,
            shutdown_room: Some(json!({
                "kicked_users": [],
                "failed_to_kick_users": [],
                "local_aliases": [],
                "new_room_id": null,
            })),
        },
    );
    let weak = Arc::downgrade(services);
    let room_id = room_id.to_owned();
    let task_id = id.clone();
    tokio::spawn(async move {
        let Some(s) = weak.upgrade() else { return };
        let result = delete_room(&s, &room_id, Some(&task_id), purge).await;
        s.retention.update(&task_id, |t| match result {
            Ok(v) => {
                t.status = "complete".into();
                t.shutdown_room = Some(v);
            }
            Err(e) => {
                t.status = "failed".into();
                t.error = Some(e.to_string());
            }
        });
    });
    id
}

fn pending_deletions(services: &Services) -> Result<Vec<OwnedRoomId>> {
    let mut out = Vec::new();
    for entry in services
        .storage
        .scan_prefix(Table::Global, &keys::prefix(&[DELETING]))?
        .take(1000)
    {
        let (k, _) = entry?;
        if let Some(room) = keys::last_part(&k).and_then(|r| RoomId::parse(r).ok()) {
            out.push(room);
        }
    }
    Ok(out)
}

async fn finish_deletion(services: &Services, room_id: &RoomId) -> Result<()> {
    services.rooms.delete_room_rows(room_id).await?;
    let mut batch = services.storage.batch();
    batch.delete(Table::Global, &keys::join(&[DELETING, room_id.as_str()]))?;
    batch.commit()
}
