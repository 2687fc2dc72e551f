//! The scale scenario: grow one server to `--scale-users` users, `--scale-rooms` rooms and
//! `--scale-events` messages through the Client-Server API, and at each step (a percentage of
//! that size) measure disk bytes, RSS and the initial sync of a user who is in every room.
//!
//! Not part of "all": at full size it runs for many minutes. Run it with `--scenarios scale`.

use std::{
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use futures_util::{stream, StreamExt};
use serde_json::json;

use crate::{
    api::{enc, User},
    report::{proc_stats, Recorder, ScenarioResult},
    scenarios::{create_room, join, send, Ctx},
};

/// Everything grown so far; each step adds to it.
struct World {
    observer: User,
    users: Vec<User>,
    /// Each room with the users who joined it.
    rooms: Vec<(String, Vec<User>)>,
    messages: usize,
}

pub async fn run(ctx: &mut Ctx<'_>) -> Vec<ScenarioResult> {
    let args = ctx.args;
    let Some(observer) = ctx.users(1).await.pop() else {
        eprintln!("scale: cannot register the observer");
        return vec![];
    };
    let mut world = World {
        observer,
        users: Vec::new(),
        rooms: Vec::new(),
        messages: 0,
    };
    let mut out = Vec::new();
    let mut steps = args.scale_steps.clone();
    steps.sort_unstable();
    steps.dedup();
    for pct in steps.into_iter().filter(|p| (1..=100).contains(p)) {
        let want_users = args.scale_users * pct / 100;
        let want_rooms = (args.scale_rooms * pct / 100).max(1);
        let want_messages = args.scale_events * pct / 100;
        eprintln!(
            "scale {pct}%: growing to {want_users} users, {want_rooms} rooms, {want_messages} messages"
        );
        grow_users(ctx, &mut world, want_users).await;
        grow_rooms(ctx, &mut world, want_rooms).await;
        let before = proc_stats(args.pid);
        let t = Instant::now();
        let rec = grow_messages(ctx, &mut world, want_messages).await;
        let send_wall = t.elapsed();
        let mut r = ctx.finish(rec, &format!("scale_{pct}pct_send"), send_wall, before);

        let (sync_ms, sync_bytes) = observer_initial_sync(ctx, &world).await;
        let disk = args.data_dir.as_deref().map(dir_bytes).unwrap_or(0);
        let memberships: usize = world.rooms.iter().map(|(_, m)| m.len() + 1).sum();
        r.extra
            .insert("users".into(), world.users.len() as f64 + 1.0);
        r.extra.insert("rooms".into(), world.rooms.len() as f64);
        r.extra.insert("memberships".into(), memberships as f64);
        r.extra.insert("messages".into(), world.messages as f64);
        r.extra.insert("disk_bytes".into(), disk as f64);
        if world.messages > 0 && disk > 0 {
            r.extra.insert(
                "disk_bytes_per_message".into(),
                disk as f64 / world.messages as f64,
            );
        }
        if let Some(p) = proc_stats(args.pid) {
            r.extra
                .insert("rss_mib".into(), p.vm_rss_kb as f64 / 1024.0);
            r.extra
                .insert("hwm_mib".into(), p.vm_hwm_kb as f64 / 1024.0);
        }
        r.extra.insert("initial_sync_ms".into(), sync_ms);
        r.extra
            .insert("initial_sync_bytes".into(), sync_bytes as f64);
        out.push(r);
    }
    out
}

async fn grow_users(ctx: &mut Ctx<'_>, world: &mut World, want: usize) {
    if want > world.users.len() {
        let more = ctx.users(want - world.users.len()).await;
        world.users.extend(more);
    }
}

/// New rooms are created by the observer (so it is in every room) and joined by
/// `--scale-members` users, taken round-robin from everybody registered so far.
async fn grow_rooms(ctx: &Ctx<'_>, world: &mut World, want: usize) {
    let api = ctx.api;
    let start = world.rooms.len();
    let observer = world.observer.clone();
    let created: Vec<Option<String>> = stream::iter(start..want)
        .map(|i| {
            let observer = observer.clone();
            async move { create_room(api, &observer, &format!("scale {i}")).await }
        })
        .buffered(ctx.args.setup_concurrency)
        .collect()
        .await;
    let n_users = world.users.len();
    let per_room = ctx.args.scale_members.min(n_users);
    let mut joins = Vec::new();
    for (offset, room) in created.into_iter().enumerate() {
        let Some(room) = room else { continue };
        let i = start + offset;
        let members: Vec<User> = (0..per_room)
            .map(|k| world.users[(i * per_room + k) % n_users].clone())
            .collect();
        for m in &members {
            joins.push((m.clone(), room.clone()));
        }
        world.rooms.push((room, members));
    }
    let failed = AtomicUsize::new(0);
    stream::iter(joins)
        .for_each_concurrent(ctx.args.setup_concurrency, |(u, r)| {
            let failed = &failed;
            async move {
                if join(api, &u, &r).await != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .await;
    let failed = failed.into_inner();
    if failed > 0 {
        eprintln!("scale: {failed} joins failed");
    }
}

/// Messages spread round-robin over the rooms, each sent by one of the room's members, with
/// `--scale-concurrency` requests in flight. Measured: this is the step's send throughput.
async fn grow_messages(ctx: &Ctx<'_>, world: &mut World, want: usize) -> Recorder {
    let api = ctx.api;
    let start = world.messages;
    if want <= start || world.rooms.is_empty() {
        return Recorder::default();
    }
    let rooms = &world.rooms;
    let observer = &world.observer;
    let recs: Vec<Recorder> = stream::iter(start..want)
        .map(|i| async move {
            let (room, members) = &rooms[i % rooms.len()];
            let sender = if members.is_empty() {
                observer
            } else {
                &members[(i / rooms.len()) % members.len()]
            };
            let mut rec = Recorder::default();
            let t = Instant::now();
            let status = send(
                api,
                sender,
                room,
                &format!("s{i}"),
                &format!("scale message {i}"),
            )
            .await;
            rec.record(status, t.elapsed());
            rec
        })
        .buffer_unordered(ctx.args.scale_concurrency.max(1))
        .collect()
        .await;
    let mut rec = Recorder::default();
    recs.into_iter().for_each(|r| rec.merge(r));
    world.messages = want;
    rec
}

/// The median of three initial syncs of the observer (in every room), and the response size.
async fn observer_initial_sync(ctx: &Ctx<'_>, world: &World) -> (f64, usize) {
    let mut times = Vec::new();
    let mut bytes = 0;
    for i in 0..3 {
        // A distinct filter each time, so no server can answer from a cache of the last one.
        let filter = json!({ "room": { "timeline": { "limit": 10 } }, "account_data": { "limit": 1000 + i } });
        let path = format!(
            "/_matrix/client/v3/sync?timeout=0&filter={}",
            enc(&filter.to_string())
        );
        let t = Instant::now();
        let (status, body, size) = ctx.api.get_sized(&path, &world.observer.token).await;
        let took = t.elapsed().as_secs_f64() * 1000.0;
        let joined = body["rooms"]["join"]
            .as_object()
            .map(|o| o.len())
            .unwrap_or(0);
        if status != 200 || joined != world.rooms.len() {
            eprintln!(
                "scale: observer initial sync returned {status} with {joined} of {} rooms",
                world.rooms.len()
            );
        }
        times.push(took);
        bytes = size;
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], bytes)
}

/// Bytes of all files under `dir` (what the database occupies, WAL included). Bounded depth.
fn dir_bytes(dir: &Path) -> u64 {
    fn walk(dir: &Path, depth: usize) -> u64 {
        if depth > 8 {
            return 0;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path(), depth + 1),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }
    walk(dir, 0)
}
