//! The scenarios. Each measures one thing; setup work (users, rooms, members) is not measured.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::{
    api::{enc, Api, User},
    report::{ms, proc_stats, Recorder, Run, ScenarioResult},
    Args,
};

const PASSWORD: &str = "bench-password-1";

pub(crate) struct Ctx<'a> {
    pub(crate) args: &'a Args,
    pub(crate) api: &'a Api,
    prefix: String,
    next_user: usize,
}

impl Ctx<'_> {
    fn wants(&self, name: &str) -> bool {
        self.args.scenarios == "all" || self.named(name)
    }

    /// Asked for by name (scenarios that "all" leaves out).
    fn named(&self, name: &str) -> bool {
        self.args.scenarios.split(',').any(|s| s.trim() == name)
    }

    /// Register `n` fresh users (setup, not measured).
    pub(crate) async fn users(&mut self, n: usize) -> Vec<User> {
        let start = self.next_user;
        self.next_user += n;
        let (api, prefix, token) = (
            self.api.clone(),
            self.prefix.clone(),
            self.args.registration_token.clone(),
        );
        let users: Vec<Option<User>> = stream::iter(start..start + n)
            .map(|i| {
                let (api, prefix, token) = (api.clone(), prefix.clone(), token.clone());
                async move {
                    api.register(&format!("{prefix}u{i}"), PASSWORD, token.as_deref())
                        .await
                        .ok()
                }
            })
            .buffered(self.args.setup_concurrency)
            .collect()
            .await;
        let users: Vec<User> = users.into_iter().flatten().collect();
        if users.len() < n {
            eprintln!(
                "warning: only {} of {n} setup users registered",
                users.len()
            );
        }
        users
    }

    pub(crate) fn finish(
        &self,
        rec: Recorder,
        name: &str,
        wall: Duration,
        before: Option<crate::report::ProcStats>,
    ) -> ScenarioResult {
        let r = rec.finish(name, wall, before, proc_stats(self.args.pid));
        eprintln!("done: {name} ({} ok, {:.1}/s)", r.count, r.ops_per_s);
        r
    }
}

pub(crate) async fn create_room(api: &Api, owner: &User, name: &str) -> Option<String> {
    let (status, body) = api
        .post(
            "/_matrix/client/v3/createRoom",
            &owner.token,
            &json!({ "preset": "public_chat", "name": name }),
        )
        .await;
    if status == 200 {
        body["room_id"].as_str().map(str::to_owned)
    } else {
        eprintln!("createRoom failed: {status} {body}");
        None
    }
}

pub(crate) async fn join(api: &Api, user: &User, room_id: &str) -> u16 {
    api.post(
        &format!("/_matrix/client/v3/rooms/{}/join", enc(room_id)),
        &user.token,
        &json!({}),
    )
    .await
    .0
}

pub(crate) async fn send(api: &Api, user: &User, room_id: &str, txn: &str, body: &str) -> u16 {
    api.put(
        &format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
            enc(room_id),
            enc(txn)
        ),
        &user.token,
        &json!({ "msgtype": "m.text", "body": body }),
    )
    .await
    .0
}

/// Join every user to every room (setup).
async fn join_all(api: &Api, users: &[User], rooms: &[String], concurrency: usize) {
    let pairs: Vec<(User, String)> = rooms
        .iter()
        .flat_map(|r| users.iter().map(move |u| (u.clone(), r.clone())))
        .collect();
    stream::iter(pairs)
        .for_each_concurrent(concurrency, |(u, r)| async move {
            join(api, &u, &r).await;
        })
        .await;
}

pub async fn run_all(args: &Args, api: &Api) -> Run {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut ctx = Ctx {
        args,
        api,
        prefix: format!("b{}", started % 1_000_000),
        next_user: 0,
    };
    let mut results = Vec::new();

    // Register and log in N users.
    let mut pool: Vec<User> = Vec::new();
    if ctx.wants("register") {
        let before = proc_stats(args.pid);
        let t = Instant::now();
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let names: Vec<String> = (0..args.users)
            .map(|i| format!("{}r{i}", ctx.prefix))
            .collect();
        let users: Vec<Option<User>> = stream::iter(names.clone())
            .map(|name| {
                let rec = rec.clone();
                async move {
                    let t = Instant::now();
                    let r = api
                        .register(&name, PASSWORD, args.registration_token.as_deref())
                        .await;
                    let mut rec = rec.lock().await;
                    match r {
                        Ok(u) => {
                            rec.ok(t.elapsed());
                            Some(u)
                        }
                        Err(_) => {
                            rec.err(400);
                            None
                        }
                    }
                }
            })
            .buffered(8)
            .collect()
            .await;
        let rec = Arc::try_unwrap(rec)
            .ok()
            .map(|m| m.into_inner())
            .unwrap_or_default();
        results.push(ctx.finish(rec, "register", t.elapsed(), before));
        pool = users.into_iter().flatten().collect();

        let before = proc_stats(args.pid);
        let t = Instant::now();
        let recs: Vec<Recorder> = stream::iter(names)
            .map(|name| async move {
                let mut rec = Recorder::default();
                let t = Instant::now();
                match api.login(&name, PASSWORD).await {
                    Ok(_) => rec.ok(t.elapsed()),
                    Err(_) => rec.err(400),
                }
                rec
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut rec = Recorder::default();
        recs.into_iter().for_each(|r| rec.merge(r));
        results.push(ctx.finish(rec, "login", t.elapsed(), before));
    }
    if pool.len() < 10 {
        let more = ctx.users(10 - pool.len()).await;
        pool.extend(more);
    }
    let Some(owner) = pool.first().cloned() else {
        eprintln!(
            "hafen-bench: could not register any user; is registration open or the token right?"
        );
        return Run {
            label: args.label.clone(),
            base_url: args.base_url.clone(),
            started_unix: started,
            scenarios: results,
            proc_end: proc_stats(args.pid),
        };
    };

    if ctx.wants("create_rooms") {
        let before = proc_stats(args.pid);
        let t = Instant::now();
        let recs: Vec<Recorder> = stream::iter(0..args.rooms)
            .map(|i| {
                let user = pool[i % pool.len()].clone();
                async move {
                    let mut rec = Recorder::default();
                    let t = Instant::now();
                    let (status, _) = api
                        .post(
                            "/_matrix/client/v3/createRoom",
                            &user.token,
                            &json!({ "preset": "public_chat", "name": format!("room {i}") }),
                        )
                        .await;
                    rec.record(status, t.elapsed());
                    rec
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut rec = Recorder::default();
        recs.into_iter().for_each(|r| rec.merge(r));
        results.push(ctx.finish(rec, "create_rooms", t.elapsed(), before));
    }

    let senders: Vec<User> = pool.iter().take(args.senders.max(1)).cloned().collect();
    let mut one_room: Option<String> = None;
    if ctx.wants("send_one_room") || ctx.wants("messages") {
        if let Some(room) = create_room(api, &owner, "send one room").await {
            join_all(api, &senders, std::slice::from_ref(&room), 8).await;
            let before = proc_stats(args.pid);
            let t = Instant::now();
            let rec = send_load(
                api,
                &senders,
                std::slice::from_ref(&room),
                args.messages,
                "one",
            )
            .await;
            let mut r = ctx.finish(rec, "send_one_room", t.elapsed(), before);
            r.extra.insert("members".into(), senders.len() as f64);
            results.push(r);
            one_room = Some(room);
        }
    }

    if ctx.wants("send_many_rooms") {
        let mut rooms = Vec::new();
        for i in 0..50 {
            if let Some(r) = create_room(api, &owner, &format!("many {i}")).await {
                rooms.push(r);
            }
        }
        join_all(api, &senders, &rooms, 8).await;
        let before = proc_stats(args.pid);
        let t = Instant::now();
        let rec = send_load(api, &senders, &rooms, args.messages, "many").await;
        let mut r = ctx.finish(rec, "send_many_rooms", t.elapsed(), before);
        r.extra.insert("rooms".into(), rooms.len() as f64);
        results.push(r);
    }

    if ctx.wants("delivery_latency") {
        if let Some(r) = delivery_latency(&ctx, &pool).await {
            results.push(r);
        }
    }

    if ctx.wants("initial_sync") {
        for &n in &args.sync_rooms.clone() {
            results.extend(initial_sync(&mut ctx, &pool, n).await);
        }
    }

    if ctx.wants("join") {
        for &n in &args.joiners.clone() {
            if let Some(r) = join_scenario(&mut ctx, &owner, n).await {
                results.push(r);
            }
        }
    }

    if ctx.wants("messages") {
        if let Some(room) = &one_room {
            // Top the room up to the pagination size (setup).
            let have = if ctx.wants("send_one_room") {
                args.messages
            } else {
                0
            };
            if args.pagination_events > have {
                send_load(
                    api,
                    &senders,
                    std::slice::from_ref(room),
                    args.pagination_events - have,
                    "fill",
                )
                .await;
            }
            results.push(messages_scenario(&ctx, &owner, room).await);
        }
    }

    if ctx.wants("http_ceiling") {
        results.push(http_ceiling(&ctx).await);
    }

    if ctx.named("scale") {
        results.extend(crate::scale::run(&mut ctx).await);
    }
    if ctx.named("state_at") {
        results.extend(crate::state_at::run(&mut ctx).await);
    }

    Run {
        label: args.label.clone(),
        base_url: args.base_url.clone(),
        started_unix: started,
        scenarios: results,
        proc_end: proc_stats(args.pid),
    }
}

/// `total` messages from all senders at once, spread round-robin over `rooms`.
async fn send_load(
    api: &Api,
    senders: &[User],
    rooms: &[String],
    total: usize,
    tag: &str,
) -> Recorder {
    let per_sender = total / senders.len().max(1);
    let tasks = senders.iter().enumerate().map(|(s, user)| {
        let (api, user, rooms, tag) = (api.clone(), user.clone(), rooms.to_vec(), tag.to_owned());
        tokio::spawn(async move {
            let mut rec = Recorder::default();
            for i in 0..per_sender {
                let room = &rooms[(s + i) % rooms.len()];
                let t = Instant::now();
                let status = send(
                    &api,
                    &user,
                    room,
                    &format!("{tag}-{s}-{i}"),
                    &format!("message {i} from {s}"),
                )
                .await;
                rec.record(status, t.elapsed());
            }
            rec
        })
    });
    let mut rec = Recorder::default();
    for r in futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .flatten()
    {
        rec.merge(r);
    }
    rec
}

/// Time from the start of a send request to the event's arrival in another user's long-poll.
async fn delivery_latency(ctx: &Ctx<'_>, pool: &[User]) -> Option<ScenarioResult> {
    let (api, args) = (ctx.api, ctx.args);
    let sender = pool.first()?.clone();
    let receiver = pool.get(1)?.clone();
    let room = create_room(api, &sender, "latency").await?;
    join(api, &receiver, &room).await;
    let (status, body) = api
        .get("/_matrix/client/v3/sync?timeout=0", &receiver.token)
        .await;
    if status != 200 {
        return None;
    }
    let mut since = body["next_batch"].as_str()?.to_owned();
    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let n = args.latency_messages;
    let before = proc_stats(args.pid);
    let t0 = Instant::now();
    let sender_task = {
        let (api, sent_at, room) = (api.clone(), sent_at.clone(), room.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            for i in 0..n {
                tick.tick().await;
                let body = format!("lat-{i}");
                sent_at.lock().await.insert(body.clone(), Instant::now());
                let (api, sender, room) = (api.clone(), sender.clone(), room.clone());
                tokio::spawn(
                    async move { send(&api, &sender, &room, &format!("lat{i}"), &body).await },
                );
            }
        })
    };
    let mut rec = Recorder::default();
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(30) + Duration::from_millis(20 * n as u64);
    while seen < n && Instant::now() < deadline {
        // A generous timeline limit: a slow server batches many messages into one response, and
        // a limited timeline would drop the older ones from it.
        let filter = r#"{"room":{"timeline":{"limit":1000}}}"#;
        let path = format!(
            "/_matrix/client/v3/sync?timeout=10000&since={}&filter={}",
            enc(&since),
            enc(filter)
        );
        let (status, body) = api.get(&path, &receiver.token).await;
        let arrived = Instant::now();
        if status != 200 {
            rec.err(status);
            continue;
        }
        if let Some(next) = body["next_batch"].as_str() {
            since = next.to_owned();
        }
        let events = body["rooms"]["join"][&room]["timeline"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let sent = sent_at.lock().await;
        for e in events {
            if let Some(b) = e["content"]["body"].as_str() {
                if let Some(t) = sent.get(b) {
                    rec.ok(arrived.duration_since(*t));
                    seen += 1;
                }
            }
        }
    }
    let _ = sender_task.await;
    let missing = n - seen.min(n);
    for _ in 0..missing {
        rec.err(0);
    }
    Some(ctx.finish(rec, "delivery_latency", t0.elapsed(), before))
}

/// Initial sync of a user in `n` rooms, each with 20 messages and 10 members.
async fn initial_sync(ctx: &mut Ctx<'_>, pool: &[User], n: usize) -> Vec<ScenarioResult> {
    let api = ctx.api;
    let Some(user) = ctx.users(1).await.pop() else {
        return vec![];
    };
    let members: Vec<User> = pool.iter().take(9).cloned().collect();
    let mut rooms = Vec::new();
    for i in 0..n {
        if let Some(r) = create_room(api, &user, &format!("sync {n} {i}")).await {
            rooms.push(r);
        }
    }
    join_all(api, &members, &rooms, 8).await;
    let mut everyone = members.clone();
    everyone.push(user.clone());
    let _ = send_load(
        api,
        &everyone,
        &rooms,
        rooms.len() * 20,
        &format!("sync{n}"),
    )
    .await;

    let mut out = Vec::new();
    for (name, lazy) in [("", false), ("_lazy", true)] {
        let before = proc_stats(ctx.args.pid);
        let t = Instant::now();
        let mut rec = Recorder::default();
        let mut bytes = 0usize;
        for i in 0..3 {
            // A distinct filter each time, so no server can answer from a cache of the last one.
            let mut filter = json!({ "room": { "timeline": { "limit": 10 } }, "account_data": { "limit": 1000 + i } });
            if lazy {
                filter["room"]["state"] = json!({ "lazy_load_members": true });
            }
            let path = format!(
                "/_matrix/client/v3/sync?timeout=0&filter={}",
                enc(&filter.to_string())
            );
            let t = Instant::now();
            let (status, _, size) = api.get_sized(&path, &user.token).await;
            rec.record(status, t.elapsed());
            bytes = size;
        }
        let mut r = ctx.finish(
            rec,
            &format!("initial_sync_{n}_rooms{name}"),
            t.elapsed(),
            before,
        );
        r.extra.insert("response_bytes".into(), bytes as f64);
        out.push(r);
    }
    out
}

/// `n` users join one room, one after another: latency of the first and the last tenth.
async fn join_scenario(ctx: &mut Ctx<'_>, owner: &User, n: usize) -> Option<ScenarioResult> {
    let api = ctx.api;
    let joiners = ctx.users(n).await;
    let room = create_room(api, owner, &format!("join {n}")).await?;
    let before = proc_stats(ctx.args.pid);
    let t0 = Instant::now();
    let mut rec = Recorder::default();
    let mut lat = Vec::with_capacity(joiners.len());
    for u in &joiners {
        let t = Instant::now();
        let status = join(api, u, &room).await;
        let took = t.elapsed();
        rec.record(status, took);
        lat.push(took);
    }
    let tenth = (lat.len() / 10).max(1);
    let median = |s: &[Duration]| -> f64 {
        let mut v = s.to_vec();
        v.sort();
        v.get(v.len() / 2).map(|d| ms(*d)).unwrap_or(0.0)
    };
    let first = median(&lat[..tenth.min(lat.len())]);
    let last = median(&lat[lat.len().saturating_sub(tenth)..]);
    let mut r = ctx.finish(rec, &format!("join_{n}_users"), t0.elapsed(), before);
    r.extra.insert("first_tenth_p50_ms".into(), first);
    r.extra.insert("last_tenth_p50_ms".into(), last);
    r.extra.insert(
        "last_over_first".into(),
        if first > 0.0 { last / first } else { 0.0 },
    );
    Some(r)
}

/// Paginate backwards through a room with /messages, 100 events a page.
async fn messages_scenario(ctx: &Ctx<'_>, user: &User, room: &str) -> ScenarioResult {
    let api = ctx.api;
    let before = proc_stats(ctx.args.pid);
    let t0 = Instant::now();
    let mut rec = Recorder::default();
    let mut from: Option<String> = None;
    let mut events = 0usize;
    for _ in 0..1000 {
        let mut path = format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100",
            enc(room)
        );
        if let Some(f) = &from {
            path.push_str(&format!("&from={}", enc(f)));
        }
        let t = Instant::now();
        let (status, body) = api.get(&path, &user.token).await;
        rec.record(status, t.elapsed());
        let chunk = body["chunk"].as_array().map(|c| c.len()).unwrap_or(0);
        events += chunk;
        match body["end"].as_str() {
            Some(end) if chunk > 0 && status == 200 => from = Some(end.to_owned()),
            _ => break,
        }
    }
    let wall = t0.elapsed();
    let mut r = ctx.finish(rec, "messages_pagination", wall, before);
    r.extra.insert("events".into(), events as f64);
    r.extra.insert(
        "events_per_s".into(),
        events as f64 / wall.as_secs_f64().max(1e-9),
    );
    r
}

/// Requests per second on /_matrix/client/versions: the ceiling the HTTP stack allows.
async fn http_ceiling(ctx: &Ctx<'_>) -> ScenarioResult {
    let api = ctx.api;
    let secs = ctx.args.ceiling_secs;
    let before = proc_stats(ctx.args.pid);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(secs);
    let tasks = (0..64).map(|_| {
        let api = api.clone();
        tokio::spawn(async move {
            let mut rec = Recorder::default();
            // Bounded: at most this many requests per task, however fast the server is.
            for _ in 0..1_000_000 {
                if Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                let (status, _) = api
                    .call(reqwest::Method::GET, "/_matrix/client/versions", None, None)
                    .await;
                rec.record(status, t.elapsed());
            }
            rec
        })
    });
    let mut rec = Recorder::default();
    for r in futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .flatten()
    {
        rec.merge(r);
    }
    let _: &Value = &Value::Null;
    ctx.finish(rec, "http_ceiling_versions", t0.elapsed(), before)
}
