//! Delivery to push gateways (the Push Gateway API, `POST /_matrix/push/v1/notify`).
//!
//! One task for the server. It wakes when the write path reports new notifications (or every
//! few seconds, to retry), reads each affected pusher's notifications after its cursor, posts
//! them one by one and moves the cursor. A failing gateway is retried with exponential backoff;
//! a notification that could not be delivered for a day is given up. Gateways that reject a
//! pushkey lose the pusher.
//!
//! Gateways are reached like URL previews reach pages: only public addresses (or ranges in
//! `push_gateway_ip_range_allowlist`), checked on every resolution, so a pusher URL cannot be
//! used to probe the server's own network. Pushers are served concurrently, so one slow
//! gateway does not hold up everybody else's notifications.

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use ipnet::IpNet;
use parking_lot::Mutex;

use ruma::{events::StateEventType, push::Action, UserId};
use serde_json::{json, Map, Value};

use super::{notifications::Notification, pushers::StoredPusher, PendingPushes};
use crate::{
    error::Result,
    service::{
        media::addr::{parse_ranges, url_allowed, GuardedResolver},
        Services,
    },
    utils,
};

/// How often the task looks at every pusher (retries, anything missed).
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Notifications posted per pusher per round; the next round continues.
const BATCH: usize = 20;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(600);
/// A notification not delivered within this is dropped (the gateway is gone or broken).
const GIVE_UP_AFTER_MS: u64 = 24 * 3600 * 1000;
/// Pushers served at the same time.
const CONCURRENT_DELIVERIES: usize = 16;
/// Largest gateway answer read (it only lists rejected pushkeys).
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// `/notifications` keeps a month of history.
const NOTIFICATION_RETENTION_MS: u64 = 30 * 24 * 3600 * 1000;
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Backoff state of one failing pusher.
struct Backoff {
    next_attempt: Instant,
    delay: Duration,
}

/// The operator's extra ranges for push gateways (invalid entries were refused at startup).
fn allowlist(s: &Services) -> Vec<IpNet> {
    parse_ranges(&s.config.push_gateway_ip_range_allowlist)
}

/// Run until the services are dropped (the server shut down).
pub async fn run(services: Weak<Services>, pending: Arc<PendingPushes>) {
    let Some(allow) = services.upgrade().map(|s| Arc::new(allowlist(&s))) else {
        return;
    };
    let client = match reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver::new(allow.clone())))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("push gateway client could not be built: {e}");
            return;
        }
    };
    let backoff: Mutex<HashMap<Vec<u8>, Backoff>> = Mutex::new(HashMap::new());
    let mut last_prune = Instant::now();
    let mut sweep = true;
    loop {
        let Some(s) = services.upgrade() else { return };
        let users = pending.take();
        let pushers = if sweep {
            s.push.pushers.all()
        } else {
            users
                .iter()
                .map(|u| s.push.pushers.of_user(u))
                .collect::<Result<Vec<_>>>()
                .map(|v| v.into_iter().flatten().collect())
        };
        match pushers {
            Ok(pushers) => {
                if sweep {
                    pending.set_users_with_pushers(
                        pushers.iter().map(|p| p.user_id.clone()).collect(),
                    );
                }
                futures_util::stream::iter(pushers)
                    .for_each_concurrent(CONCURRENT_DELIVERIES, |p| {
                        let (s, client, backoff, allow) = (&s, &client, &backoff, &allow);
                        async move {
                            if let Err(e) = deliver(s, client, &p, backoff, allow).await {
                                tracing::warn!("push delivery for {}: {e}", p.user_id);
                            }
                        }
                    })
                    .await;
            }
            Err(e) => tracing::warn!("reading pushers: {e}"),
        }
        if last_prune.elapsed() >= PRUNE_INTERVAL {
            last_prune = Instant::now();
            let cutoff = utils::now_ms().saturating_sub(NOTIFICATION_RETENTION_MS);
            let s2 = s.clone();
            // A full table walk: off the async workers.
            let pruned =
                tokio::task::spawn_blocking(move || s2.push.notifications.prune(cutoff, 100_000))
                    .await;
            if let Ok(Err(e)) = pruned {
                tracing::warn!("pruning notifications: {e}");
            }
        }
        drop(s);
        sweep = tokio::select! {
            _ = pending.wake.notified() => false,
            _ = tokio::time::sleep(SWEEP_INTERVAL) => true,
        };
    }
}

/// Read at most [`MAX_ANSWER_BYTES`] of a gateway's answer as JSON (Null if unreadable).
async fn bounded_json(mut resp: reqwest::Response) -> Value {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Value::Null;
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).unwrap_or(Value::Null)
}

/// Post the pusher's undelivered notifications, oldest first, until one fails.
async fn deliver(
    s: &Services,
    client: &reqwest::Client,
    pusher: &StoredPusher,
    backoff: &Mutex<HashMap<Vec<u8>, Backoff>>,
    allow: &[IpNet],
) -> Result<()> {
    let id = [
        pusher.user_id.as_bytes(),
        pusher.app_id().as_bytes(),
        pusher.pushkey().as_bytes(),
    ]
    .join(&0xff);
    if backoff
        .lock()
        .get(&id)
        .is_some_and(|b| b.next_attempt > Instant::now())
    {
        return Ok(());
    }
    let Some(url) = pusher.pusher.pointer("/data/url").and_then(Value::as_str) else {
        return Ok(());
    };
    let url_ok = url_allowed(url, allow);
    // The gateway as the register of destinations names it: host and port.
    let gateway = reqwest::Url::parse(url).ok().and_then(|u| {
        let host = u.host_str()?.to_owned();
        Some(match u.port() {
            Some(p) => format!("{host}:{p}"),
            None => host,
        })
    });
    // Only notifications whose event is durable (below the watermark) are pushed.
    let watermark = s.globals.counter.watermark();
    let mut cursor = pusher.cursor;
    for (count, n) in s.push.notifications.after(&pusher.user_id, cursor, BATCH)? {
        if count > watermark {
            break;
        }
        let delivered = if url_ok {
            let body = payload(s, pusher, &n)?;
            if let Some(host) = &gateway {
                s.register
                    .contact(crate::policy::register::PUSH_GATEWAY, host);
            }
            match client.post(url).json(&body).send().await {
                Ok(resp) if resp.status().is_success() => {
                    let answer = bounded_json(resp).await;
                    let rejected = answer
                        .get("rejected")
                        .and_then(Value::as_array)
                        .is_some_and(|r| r.iter().any(|k| k.as_str() == Some(pusher.pushkey())));
                    if rejected {
                        tracing::info!("push gateway rejected a pushkey of {}", pusher.user_id);
                        backoff.lock().remove(&id);
                        return s.push.pushers.reject(pusher);
                    }
                    true
                }
                Ok(resp) => {
                    tracing::debug!("push gateway answered {}", resp.status());
                    false
                }
                Err(e) => {
                    tracing::debug!("push gateway unreachable: {e}");
                    false
                }
            }
        } else {
            tracing::debug!("push gateway address not allowed for {}", pusher.user_id);
            false
        };
        if !delivered && utils::now_ms().saturating_sub(n.ts) < GIVE_UP_AFTER_MS {
            let mut b = backoff.lock();
            let delay = b
                .get(&id)
                .map_or(FIRST_RETRY, |b| (b.delay * 2).min(MAX_RETRY));
            b.insert(
                id,
                Backoff {
                    next_attempt: Instant::now() + delay,
                    delay,
                },
            );
            break;
        }
        backoff.lock().remove(&id);
        cursor = count;
    }
    if cursor > pusher.cursor {
        s.push.pushers.advance(pusher, cursor)?;
    }
    Ok(())
}

/// The `notification` body for one pusher, in the pusher's format.
fn payload(s: &Services, pusher: &StoredPusher, n: &Notification) -> Result<Value> {
    let user = &pusher.user_id;
    let unread = s.push.notifications.total_unread(user)?;
    let mut data = pusher
        .pusher
        .get("data")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    data.remove("url");
    let device = json!({
        "app_id": pusher.app_id(),
        "pushkey": pusher.pushkey(),
        "pushkey_ts": pusher.created_ms / 1000,
        "data": data,
        "tweaks": tweaks(&n.actions),
    });
    let prio = if n.actions.iter().any(|a| matches!(a, Action::SetTweak(_))) {
        "high"
    } else {
        "low"
    };
    let mut notification = Map::new();
    notification.insert("event_id".into(), json!(n.event_id));
    notification.insert("room_id".into(), json!(n.room_id));
    notification.insert("counts".into(), json!({ "unread": unread }));
    notification.insert("devices".into(), json!([device]));
    notification.insert("prio".into(), json!(prio));
    let event_id_only = pusher
        .pusher
        .pointer("/data/format")
        .and_then(Value::as_str)
        == Some("event_id_only");
    if !event_id_only {
        if let Some(pdu) = s.rooms.pdu(n.event_id.as_str())? {
            notification.insert("type".into(), json!(pdu.kind));
            notification.insert("sender".into(), json!(pdu.sender));
            notification.insert("content".into(), pdu.content_value());
            if pdu.state_key.as_deref() == Some(user.as_str()) {
                notification.insert("user_is_target".into(), json!(true));
            }
            if let Some(name) = member_name(s, n, &pdu.sender)? {
                notification.insert("sender_display_name".into(), json!(name));
            }
        }
        let state = |kind: StateEventType, field: &str| -> Result<Option<Value>> {
            Ok(s.rooms
                .state_content(&n.room_id, &kind, "")?
                .and_then(|c| c.get(field).cloned()))
        };
        if let Some(name) = state(StateEventType::RoomName, "name")? {
            notification.insert("room_name".into(), name);
        }
        if let Some(alias) = state(StateEventType::RoomCanonicalAlias, "alias")? {
            notification.insert("room_alias".into(), alias);
        }
    }
    Ok(json!({ "notification": notification }))
}

fn member_name(s: &Services, n: &Notification, user: &UserId) -> Result<Option<String>> {
    Ok(s.rooms
        .state_content(&n.room_id, &StateEventType::RoomMember, user.as_str())?
        .and_then(|c| {
            c.get("displayname")
                .and_then(Value::as_str)
                .map(str::to_owned)
        }))
}

/// The `set_tweak` actions as the gateway's `tweaks` object.
fn tweaks(actions: &[Action]) -> Value {
    let mut out = Map::new();
    for a in actions {
        if let Action::SetTweak(t) = a {
            if let Ok(Value::Object(o)) = serde_json::to_value(t) {
                if let (Some(Value::String(name)), value) = (o.get("set_tweak"), o.get("value")) {
                    out.insert(name.clone(), value.cloned().unwrap_or(Value::Bool(true)));
                }
            }
        }
    }
    Value::Object(out)
}
