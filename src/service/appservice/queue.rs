//! The per-appservice transaction queue and the task that pushes it
//! (`PUT {url}/_matrix/app/v1/transactions/{txnId}`).
//!
//! Like the federation queue (`federation/sender.rs`, whose backoff this shares), an event bound
//! for an appservice is written to `appservice_queue` in the event's own batch (key: appservice id
//! 0xff `p` 0xff the event's stream count), so an event and the promise to deliver it commit
//! together and survive a restart. Ephemeral events (typing, receipts, presence) take a sequence
//! of their own (`e`). An item is deleted only once the appservice acknowledged the transaction
//! that carried it.
//!
//! The transaction being sent is recorded in `appservice_txns` (appservice id -> its id and the
//! sequences it carries) before it is sent, so a failed transaction is retried with the same id
//! and the same events, in order, also after a restart; the next transaction starts only when the
//! previous one succeeded. One worker per appservice, up to [`MAX_EVENTS`] events and
//! [`MAX_EPHEMERAL`] ephemeral events (and about 4 MiB) per transaction; backoff from 1 s up to
//! 10 minutes while the appservice fails.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Weak,
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use ruma::EventId;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use crate::{
    error::Result,
    service::{federation::sender::next_backoff, Services},
    storage::{keys, Batch, Storage, Table},
};

/// Most timeline events one transaction carries.
pub const MAX_EVENTS: usize = 100;
/// Most ephemeral events one transaction carries.
pub const MAX_EPHEMERAL: usize = 100;
/// A transaction stops taking items beyond this size (it always takes at least one).
const MAX_TXN_BYTES: usize = 4 * 1024 * 1024;
/// Transactions one worker sends before letting the task look at the others.
const ROUNDS_PER_TURN: usize = 20;
/// When nothing wakes the task it still looks at the appservices this often.
const IDLE_TICK: Duration = Duration::from_secs(30);

const PDU: &str = "p";
const EDU: &str = "e";

fn item_key(appservice: &str, kind: &str, seq: u64) -> Vec<u8> {
    keys::with_count(&[appservice, kind], seq)
}

/// Queue the event (stream count `count`) for `appservice` in the caller's batch.
pub fn queue_event(
    batch: &mut Batch,
    appservice: &str,
    count: u64,
    event_id: &EventId,
) -> Result<()> {
    batch.put(
        Table::AppserviceQueue,
        &item_key(appservice, PDU, count),
        event_id.as_bytes(),
    )
}

/// The transaction in flight for an appservice and the next transaction number.
#[derive(Default, Serialize, Deserialize)]
struct TxnState {
    next: u64,
    pending: Option<PendingTxn>,
}

#[derive(Clone, Serialize, Deserialize)]
struct PendingTxn {
    id: String,
    events: Vec<u64>,
    ephemeral: Vec<u64>,
}

#[derive(Default)]
struct Dest {
    in_flight: bool,
    pending: bool,
    delay: Duration,
    next_attempt: Option<Instant>,
}

enum Outcome {
    Idle,
    More,
    Failed,
}

pub struct Queue {
    storage: Storage,
    dirty: Mutex<BTreeSet<String>>,
    notify: std::sync::Arc<Notify>,
    edu_seq: AtomicU64,
    dests: Mutex<HashMap<String, Dest>>,
}

impl Queue {
    pub fn new(storage: Storage) -> Result<Queue> {
        // Ephemeral sequences continue above any queued one: per appservice in the queue (found
        // by jumping from one id's rows to the next), the last of its ephemeral rows.
        let mut highest = 0;
        let mut from: Vec<u8> = Vec::new();
        for _ in 0..100_000 {
            let Some(entry) = storage
                .scan_from(Table::AppserviceQueue, b"", &from, false)?
                .next()
            else {
                break;
            };
            let (k, _) = entry?;
            let id = keys::split(&k)
                .first()
                .copied()
                .unwrap_or_default()
                .to_owned();
            if let Some((last, _)) =
                storage.last_with_prefix(Table::AppserviceQueue, &keys::prefix(&[&id, EDU]))?
            {
                highest = highest.max(keys::count_suffix(&last).unwrap_or(0));
            }
            // Past every row of this id (`id 0xff kind 0xff seq`; kinds are ASCII).
            from = keys::prefix(&[&id]);
            from.push(0xff);
        }
        Ok(Queue {
            storage,
            dirty: Mutex::new(BTreeSet::new()),
            notify: std::sync::Arc::new(Notify::new()),
            edu_seq: AtomicU64::new(highest + 1),
            dests: Mutex::new(HashMap::new()),
        })
    }

    /// These appservices have new (durable) items.
    pub fn wake(&self, appservices: impl IntoIterator<Item = String>) {
        self.dirty.lock().extend(appservices);
        self.notify.notify_one();
    }

    /// The appservice showed it is up (it called the client API, or answered a ping): if we
    /// were backing off from it, retry now (as the federation sender does for a server whose
    /// request arrives).
    pub fn appservice_is_back(&self, appservice: &str) {
        let mut dests = self.dests.lock();
        if let Some(d) = dests.get_mut(appservice) {
            if d.next_attempt.is_some() {
                d.next_attempt = None;
                d.delay = Duration::ZERO;
                d.pending = true;
                drop(dests);
                self.notify.notify_one();
            }
        }
    }

    /// Queue an ephemeral event for each appservice, commit and wake the sender. Not for an
    /// appservice we are backing off from (it failed its last transaction): typing and receipts
    /// are momentary, and queuing every one while a bridge is down would grow the queue without
    /// bound (room events, which matter, are always queued).
    pub fn queue_ephemeral(&self, appservices: &[String], edu: &Value) -> Result<()> {
        let appservices: Vec<String> = {
            let dests = self.dests.lock();
            appservices
                .iter()
                .filter(|a| dests.get(*a).is_none_or(|d| d.next_attempt.is_none()))
                .cloned()
                .collect()
        };
        if appservices.is_empty() {
            return Ok(());
        }
        let bytes = serde_json::to_vec(edu)?;
        let mut batch = self.storage.batch();
        for a in &appservices {
            let seq = self.edu_seq.fetch_add(1, Ordering::Relaxed);
            batch.put(Table::AppserviceQueue, &item_key(a, EDU, seq), &bytes)?;
        }
        batch.commit()?;
        self.wake(appservices.iter().cloned());
        Ok(())
    }

    /// Items queued for `appservice` (events, ephemeral; counted up to a million each); for tests
    /// and the admin API.
    pub fn queued(&self, appservice: &str) -> Result<(usize, usize)> {
        let count = |kind: &str| -> Result<usize> {
            let mut n = 0;
            // Bounded: an appservice down for long may have a large queue; beyond a million
            // the admin sees "at least".
            for entry in self
                .storage
                .scan_prefix(Table::AppserviceQueue, &keys::prefix(&[appservice, kind]))?
                .take(1_000_000)
            {
                entry?;
                n += 1;
            }
            Ok(n)
        };
        Ok((count(PDU)?, count(EDU)?))
    }

    /// Forget everything queued for a removed appservice.
    pub fn drop_queue(&self, appservice: &str) -> Result<()> {
        let prefix = keys::prefix(&[appservice]);
        // Bounded: at most 10,000 rounds of 10,000 items.
        for _ in 0..10_000 {
            let mut batch = self.storage.batch();
            let mut n = 0;
            for entry in self
                .storage
                .scan_prefix(Table::AppserviceQueue, &prefix)?
                .take(10_000)
            {
                let (k, _) = entry?;
                batch.delete(Table::AppserviceQueue, &k)?;
                n += 1;
            }
            if n == 0 {
                batch.delete(Table::AppserviceTxns, appservice.as_bytes())?;
                batch.commit()?;
                break;
            }
            batch.commit()?;
        }
        self.dests.lock().remove(appservice);
        Ok(())
    }

    fn state(&self, appservice: &str) -> Result<TxnState> {
        Ok(self
            .storage
            .get_json::<TxnState>(Table::AppserviceTxns, appservice.as_bytes())?
            .unwrap_or_default())
    }

    /// The transaction to send: the one that failed before (same id, same items), or a new one
    /// made from the queue and recorded before it is sent. None when the queue is empty.
    fn current_txn(&self, appservice: &str) -> Result<Option<PendingTxn>> {
        let mut state = self.state(appservice)?;
        if let Some(p) = state.pending {
            return Ok(Some(p));
        }
        let take = |kind: &str, max: usize| -> Result<Vec<u64>> {
            let mut out = Vec::new();
            let mut size = 0;
            for entry in self
                .storage
                .scan_prefix(Table::AppserviceQueue, &keys::prefix(&[appservice, kind]))?
                .take(max)
            {
                let (k, v) = entry?;
                if size > MAX_TXN_BYTES / 2 {
                    break;
                }
                // Events are ids here; their size is counted when the body is built.
                size += if kind == EDU { v.len() } else { 0 };
                if let Some(seq) = keys::count_suffix(&k) {
                    out.push(seq);
                }
            }
            Ok(out)
        };
        let events = take(PDU, MAX_EVENTS)?;
        let ephemeral = take(EDU, MAX_EPHEMERAL)?;
        if events.is_empty() && ephemeral.is_empty() {
            return Ok(None);
        }
        state.next += 1;
        let txn = PendingTxn {
            id: state.next.to_string(),
            events,
            ephemeral,
        };
        state.pending = Some(txn.clone());
        self.storage.put(
            Table::AppserviceTxns,
            appservice.as_bytes(),
            &serde_json::to_vec(&state)?,
        )?;
        Ok(Some(txn))
    }

    /// The transaction's body, rebuilt from its items (deleted only after success, so all there;
    /// an event purged meanwhile is left out). Stops adding events past about 4 MiB: the rest
    /// is left for the next transaction.
    fn body(&self, s: &Services, appservice: &str, txn: &mut PendingTxn) -> Result<Value> {
        let mut events = Vec::new();
        let mut size = 0;
        let mut kept = Vec::new();
        for seq in &txn.events {
            if size > MAX_TXN_BYTES && !kept.is_empty() {
                break;
            }
            kept.push(*seq);
            let Some(id) = self
                .storage
                .get(Table::AppserviceQueue, &item_key(appservice, PDU, *seq))?
            else {
                continue;
            };
            let Some(pdu) = s.rooms.pdu(&String::from_utf8_lossy(&id))? else {
                continue;
            };
            let mut event = pdu.to_client_value(None);
            // `age` would make a retried transaction differ; `origin_server_ts` says the same.
            if let Some(unsigned) = event.get_mut("unsigned").and_then(Value::as_object_mut) {
                unsigned.remove("age");
            }
            size += serde_json::to_vec(&event)?.len();
            events.push(event);
        }
        txn.events = kept;
        let mut ephemeral = Vec::new();
        for seq in &txn.ephemeral {
            if let Some(v) = self
                .storage
                .get(Table::AppserviceQueue, &item_key(appservice, EDU, *seq))?
            {
                if let Ok(edu) = serde_json::from_slice::<Value>(&v) {
                    ephemeral.push(edu);
                }
            }
        }
        let mut body = json!({ "events": events });
        if !ephemeral.is_empty() {
            body["ephemeral"] = json!(ephemeral);
            body["de.sorunome.msc2409.ephemeral"] = json!(ephemeral);
        }
        Ok(body)
    }

    /// The appservice acknowledged `txn`: delete its items and the record, in one batch.
    fn complete(&self, appservice: &str, txn: &PendingTxn) -> Result<()> {
        let mut state = self.state(appservice)?;
        state.pending = None;
        let mut batch = self.storage.batch();
        for seq in &txn.events {
            batch.delete(Table::AppserviceQueue, &item_key(appservice, PDU, *seq))?;
        }
        for seq in &txn.ephemeral {
            batch.delete(Table::AppserviceQueue, &item_key(appservice, EDU, *seq))?;
        }
        batch.put(
            Table::AppserviceTxns,
            appservice.as_bytes(),
            &serde_json::to_vec(&state)?,
        )?;
        batch.commit()
    }

    /// Record a changed (cut) transaction before it is first sent.
    fn save_txn(&self, appservice: &str, txn: &PendingTxn) -> Result<()> {
        let mut state = self.state(appservice)?;
        state.pending = Some(txn.clone());
        self.storage.put(
            Table::AppserviceTxns,
            appservice.as_bytes(),
            &serde_json::to_vec(&state)?,
        )
    }

    /// Appservices to start now, and when the next backoff ends.
    fn schedule(&self, known: &[String]) -> (Vec<String>, Option<Instant>) {
        let fresh = std::mem::take(&mut *self.dirty.lock());
        let now = Instant::now();
        let mut dests = self.dests.lock();
        for id in fresh {
            dests.entry(id).or_default().pending = true;
        }
        dests.retain(|id, _| known.contains(id));
        let mut start = Vec::new();
        let mut next_due: Option<Instant> = None;
        for (id, d) in dests.iter_mut() {
            if d.in_flight {
                continue;
            }
            if let Some(t) = d.next_attempt {
                if t > now {
                    next_due = Some(next_due.map_or(t, |n| n.min(t)));
                    continue;
                }
                d.next_attempt = None;
                d.pending = true;
            }
            if d.pending {
                d.pending = false;
                d.in_flight = true;
                start.push(id.clone());
            }
        }
        (start, next_due)
    }

    fn finish(&self, appservice: &str, outcome: Outcome) {
        let mut dests = self.dests.lock();
        let d = dests.entry(appservice.to_owned()).or_default();
        d.in_flight = false;
        match outcome {
            Outcome::Idle => d.delay = Duration::ZERO,
            Outcome::More => {
                d.delay = Duration::ZERO;
                d.pending = true;
            }
            Outcome::Failed => {
                d.delay = next_backoff(d.delay);
                d.next_attempt = Some(Instant::now() + d.delay);
            }
        }
        drop(dests);
        self.notify.notify_one();
    }
}

/// Run until `shutdown` is set or the services are dropped.
pub async fn run(services: Weak<Services>, mut shutdown: watch::Receiver<bool>) {
    let mut workers: tokio::task::JoinSet<()> = tokio::task::JoinSet::new();
    // After a start every appservice is looked at once: its queue may hold items from before.
    if let Some(s) = services.upgrade() {
        let ids: Vec<String> = s
            .appservices
            .all()
            .iter()
            .map(|a| a.id().to_owned())
            .collect();
        s.appservices.queue.wake(ids);
    }
    loop {
        if *shutdown.borrow() {
            break;
        }
        let Some(s) = services.upgrade() else { break };
        let known: Vec<String> = s
            .appservices
            .all()
            .iter()
            .map(|a| a.id().to_owned())
            .collect();
        let (start, next_due) = s.appservices.queue.schedule(&known);
        for id in start {
            workers.spawn(worker(services.clone(), id));
        }
        let notify = s.appservices.queue.notify.clone();
        drop(s);
        let sleep = next_due
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(IDLE_TICK)
            .min(IDLE_TICK);
        tokio::select! {
            _ = notify.notified() => {}
            Some(_) = workers.join_next(), if !workers.is_empty() => {}
            _ = tokio::time::sleep(sleep) => {}
            _ = shutdown.changed() => {}
        }
    }
    workers.shutdown().await;
}

async fn worker(services: Weak<Services>, appservice: String) {
    let outcome = deliver(&services, &appservice).await;
    if let Some(s) = services.upgrade() {
        s.appservices.queue.finish(&appservice, outcome);
    }
}

/// Send the appservice's queue, one transaction at a time, until it is empty, a transaction
/// fails or the turn is over.
async fn deliver(services: &Weak<Services>, id: &str) -> Outcome {
    for _ in 0..ROUNDS_PER_TURN {
        let Some(s) = services.upgrade() else {
            return Outcome::Idle;
        };
        let Some(appservice) = s.appservices.get(id) else {
            return Outcome::Idle;
        };
        let queue = &s.appservices.queue;
        let built = queue.current_txn(id).and_then(|t| match t {
            Some(mut txn) => {
                let before = txn.events.len();
                let body = queue.body(&s, id, &mut txn)?;
                if txn.events.len() != before {
                    queue.save_txn(id, &txn)?;
                }
                Ok(Some((txn, body)))
            }
            None => Ok(None),
        });
        let (txn, body) = match built {
            Ok(Some(t)) => t,
            Ok(None) => return Outcome::Idle,
            Err(e) => {
                tracing::warn!("appservice {id}: transaction queue: {e}");
                return Outcome::Failed;
            }
        };
        let empty =
            body["events"].as_array().is_some_and(Vec::is_empty) && body.get("ephemeral").is_none();
        if !empty {
            if let Err(e) = s
                .appservices
                .client
                .put_transaction(&s, &appservice, &txn.id, &body)
                .await
            {
                tracing::info!("appservice {id}: transaction {} failed: {e}", txn.id);
                return Outcome::Failed;
            }
        }
        if let Err(e) = queue.complete(id, &txn) {
            tracing::warn!("appservice {id}: transaction queue: {e}");
            return Outcome::Failed;
        }
    }
    Outcome::More
}
