//! The state-at-an-event scenario: one room grown to `--state-events` state events over
//! `--state-keys` distinct state keys (all distinct by default, so the room's state is that
//! large; fewer keys make a long history over a small state), with a message after every tenth;
//! then `/context` (full state, no lazy loading) around an early, a middle and a late message,
//! and `/members?at=` at the same points. What it shows: reading the state at an event costs
//! what that state holds, not what the room's whole history holds.
//!
//! Not part of "all": the setup sends 10,000 events. Run it with `--scenarios state_at`.

use std::time::Instant;

use futures_util::{stream, StreamExt};
use serde_json::json;

use crate::{
    api::{enc, User},
    report::{proc_stats, Recorder, ScenarioResult},
    scenarios::{create_room, send, Ctx},
};

/// Reads measured at each point.
const READS_PER_POINT: usize = 20;

pub async fn run(ctx: &mut Ctx<'_>) -> Vec<ScenarioResult> {
    let n = ctx.args.state_events.max(10);
    let Some(owner) = ctx.users(1).await.pop() else {
        eprintln!("state_at: cannot register a user");
        return vec![];
    };
    let api = ctx.api;
    let Some(room) = create_room(api, &owner, "state-at").await else {
        return vec![];
    };
    // Setup (not measured): n state events in ten slices, a message after each slice.
    let mut anchors: Vec<String> = Vec::new();
    let slice = n / 10;
    for s in 0..10 {
        let from = s * slice;
        let to = if s == 9 { n } else { from + slice };
        stream::iter(from..to)
            .map(|i| put_state(ctx, &owner, &room, i))
            // One at a time when keys repeat: each change of a key must follow the one before.
            .buffer_unordered(if ctx.args.state_keys.is_some() {
                1
            } else {
                ctx.args.setup_concurrency.max(1)
            })
            .collect::<Vec<_>>()
            .await;
        let txn = format!("anchor-{s}-{}", std::process::id());
        if send(api, &owner, &room, &txn, &format!("anchor {s}")).await == 200 {
            if let Some(id) = last_message_id(ctx, &owner, &room).await {
                anchors.push(id);
            }
        }
    }
    eprintln!(
        "state_at: room with {n} state events, {} anchors",
        anchors.len()
    );
    let mut out = Vec::new();
    for (label, idx) in [("early", 0usize), ("middle", 4), ("late", 9)] {
        let Some(event) = anchors.get(idx) else {
            continue;
        };
        let path = format!(
            "/_matrix/client/v3/rooms/{}/context/{}?limit=1",
            enc(&room),
            enc(event)
        );
        out.push(measure(ctx, &owner, &path, &format!("context_full_state_{label}")).await);
        // The token just after the anchor: the members as of then.
        let (_, body) = api.get(&path, &owner.token).await;
        if let Some(end) = body["end"].as_str() {
            let path = format!(
                "/_matrix/client/v3/rooms/{}/members?at={}",
                enc(&room),
                enc(end)
            );
            out.push(measure(ctx, &owner, &path, &format!("members_at_{label}")).await);
        }
    }
    out
}

async fn put_state(ctx: &Ctx<'_>, owner: &User, room: &str, i: usize) -> u16 {
    ctx.api
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/state/org.hafen.bench.state/key{}",
                enc(room),
                i % ctx.args.state_keys.unwrap_or(usize::MAX).max(1)
            ),
            &owner.token,
            &json!({ "i": i }),
        )
        .await
        .0
}

/// The event id of the room's last message (the anchor just sent: nothing else sends messages).
async fn last_message_id(ctx: &Ctx<'_>, owner: &User, room: &str) -> Option<String> {
    let filter = enc(r#"{"types":["m.room.message"]}"#);
    let (_, body) = ctx
        .api
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1&filter={filter}",
                enc(room)
            ),
            &owner.token,
        )
        .await;
    body["chunk"][0]["event_id"].as_str().map(str::to_owned)
}

async fn measure(ctx: &Ctx<'_>, owner: &User, path: &str, name: &str) -> ScenarioResult {
    let before = proc_stats(ctx.args.pid);
    let t0 = Instant::now();
    let mut rec = Recorder::default();
    for _ in 0..READS_PER_POINT {
        let t = Instant::now();
        let (status, _) = ctx.api.get(path, &owner.token).await;
        rec.record(status, t.elapsed());
    }
    ctx.finish(rec, name, t0.elapsed(), before)
}
