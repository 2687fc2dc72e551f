//! The outgoing federation queue and the task that delivers it as `/send` transactions.
//!
//! Everything another server must receive is first written to `federation_queue` (key:
//! destination 0xff `p`|`e` 0xff big-endian sequence): PDUs by the event's stream count, written
//! in the event's own batch by the room write path ([`queue_pdu`]), so an event and the promise
//! to send it commit together; EDUs by a sequence of their own ([`Sender::queue_edu`]). An item is
//! deleted only once the destination acknowledged the transaction that carried it.
//!
//! One task for the server ([`run`]) starts a worker for every destination with something to
//! send, at most [`CONCURRENT_DESTINATIONS`] at a time and one transaction per destination in
//! flight. A worker sends up to 50 PDUs and 100 EDUs in key order per transaction until the
//! destination's queue is empty. A failed transaction is retried later with the same id and the
//! same items (exponential backoff from 1 s up to 10 minutes); a request from that server
//! (`server_is_back`, called by the `Signed` extractor) retries it at once. On startup every
//! destination with queued items is resumed. Destinations the policy refuses lose their queue.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Weak,
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use ruma::{EventId, OwnedServerName, RoomId, ServerName, UserId};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use crate::{
    error::Result,
    service::{rooms::Rooms, Services},
    storage::{keys, Batch, Storage, Table},
    utils,
};

/// Most PDUs one transaction carries (the spec's limit).
pub const MAX_PDUS_PER_TXN: usize = 50;
/// Most EDUs one transaction carries (the spec's limit).
pub const MAX_EDUS_PER_TXN: usize = 100;
/// A transaction stops taking items beyond this size (it always takes at least one).
const MAX_TXN_BYTES: usize = 4 * 1024 * 1024;
/// Destinations served at the same time.
pub const CONCURRENT_DESTINATIONS: usize = 32;
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(600);

/// The wait after another failure, given the last one: 1 s, then doubling up to 10 minutes.
/// Shared with the appservice queue (`service/appservice/queue.rs`).
pub fn next_backoff(last: Duration) -> Duration {
    if last.is_zero() {
        FIRST_RETRY
    } else {
        (last * 2).min(MAX_RETRY)
    }
}
/// Transactions one worker sends before giving the slot to other destinations.
const ROUNDS_PER_TURN: usize = 20;
/// How long an incoming transaction's answer is kept for retries.
pub const TXN_RETENTION_MS: u64 = 24 * 3600 * 1000;
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// When nothing wakes the task it still looks at the destinations this often.
const IDLE_TICK: Duration = Duration::from_secs(60);

const PDU: &str = "p";
const EDU: &str = "e";

fn queue_key(destination: &ServerName, kind: &str, seq: u64) -> Vec<u8> {
    keys::with_count(&[destination.as_str(), kind], seq)
}

/// Queue the event (stream count `count`) for `destination`, in the caller's batch: the event and
/// its queue entries commit atomically. Wake the sender ([`Wake::add`]) once the batch is durable.
pub fn queue_pdu(
    batch: &mut Batch,
    destination: &ServerName,
    count: u64,
    event_id: &EventId,
) -> Result<()> {
    batch.put(
        Table::FederationQueue,
        &queue_key(destination, PDU, count),
        &serde_json::to_vec(&json!({ "event_id": event_id }))?,
    )
}

/// The other servers with a joined member in the room. Derived from the in-memory member set: no
/// database read once the room's members are cached.
pub fn servers_in_room(
    rooms: &Rooms,
    room_id: &RoomId,
    ours: &ServerName,
) -> Result<BTreeSet<OwnedServerName>> {
    let mut out = BTreeSet::new();
    for user in rooms.joined_members(room_id)?.iter() {
        let server = user.server_name();
        if server != ours && !out.contains(server) {
            out.insert(server.to_owned());
        }
    }
    Ok(out)
}

/// The other servers sharing at least one joined room with `user`.
pub fn servers_sharing(
    rooms: &Rooms,
    user: &UserId,
    ours: &ServerName,
) -> Result<BTreeSet<OwnedServerName>> {
    let mut out = BTreeSet::new();
    for room in rooms.joined_rooms(user)? {
        out.extend(servers_in_room(rooms, &room, ours)?);
    }
    Ok(out)
}

/// Destinations with new items, handed from writers to the sender task.
#[derive(Default)]
pub struct Wake {
    dirty: Mutex<BTreeSet<OwnedServerName>>,
    notify: Notify,
}

impl Wake {
    /// These destinations have new (durable) items.
    pub fn add(&self, destinations: impl IntoIterator<Item = OwnedServerName>) {
        self.dirty.lock().extend(destinations);
        self.notify.notify_one();
    }

    fn take(&self) -> BTreeSet<OwnedServerName> {
        std::mem::take(&mut *self.dirty.lock())
    }
}

/// A transaction: its id and the queue keys it carries (the body is rebuilt from them on retry,
/// so a failing destination costs a few keys of memory, not its events).
#[derive(Clone, Debug)]
struct Txn {
    id: String,
    pdu_keys: Vec<Vec<u8>>,
    edu_keys: Vec<Vec<u8>>,
}

/// What the sender knows about one destination (only while it has something to do).
#[derive(Default)]
struct Dest {
    in_flight: bool,
    /// Has (or may have) items and no worker is looking at them.
    pending: bool,
    delay: Duration,
    next_attempt: Option<Instant>,
    /// The transaction that failed, sent again (same id, same items) on the next attempt.
    retry: Option<Txn>,
}

enum Outcome {
    /// The queue is empty.
    Idle,
    /// More to send; give others a turn first.
    More,
    /// The transaction failed (None: the queue could not even be read).
    Failed(Option<Txn>),
}

pub struct Sender {
    storage: Storage,
    pub wake: Arc<Wake>,
    edu_seq: AtomicU64,
    dests: Mutex<HashMap<OwnedServerName, Dest>>,
    /// Transaction ids are `<nonce><n>`, unique for this process's life.
    txn_nonce: String,
    txn_seq: AtomicU64,
}

/// A transaction with its PDUs and EDUs.
type TxnWithBody = (Txn, Vec<Value>, Vec<Value>);

impl Sender {
    /// The sender; its EDU sequence continues above the highest one queued.
    pub fn new(storage: Storage, wake: Arc<Wake>) -> Result<Sender> {
        let mut highest = 0;
        for (_, edu_max) in queued_destinations(&storage)? {
            highest = highest.max(edu_max);
        }
        Ok(Sender {
            storage,
            wake,
            edu_seq: AtomicU64::new(highest + 1),
            dests: Mutex::new(HashMap::new()),
            txn_nonce: utils::random_string(10),
            txn_seq: AtomicU64::new(1),
        })
    }

    /// Queue an EDU (`{"edu_type", "content"}`) for `destination` in the caller's batch; wake the
    /// sender after the commit.
    pub fn queue_edu(
        &self,
        batch: &mut Batch,
        destination: &ServerName,
        edu: &Value,
    ) -> Result<()> {
        let seq = self.edu_seq.fetch_add(1, Ordering::Relaxed);
        batch.put(
            Table::FederationQueue,
            &queue_key(destination, EDU, seq),
            &serde_json::to_vec(edu)?,
        )
    }

    /// Queue one EDU for every destination, commit and wake the sender.
    pub fn send_edu(
        &self,
        destinations: impl IntoIterator<Item = OwnedServerName>,
        edu: &Value,
    ) -> Result<()> {
        let destinations: Vec<OwnedServerName> = destinations.into_iter().collect();
        if destinations.is_empty() {
            return Ok(());
        }
        let mut batch = self.storage.batch();
        for d in &destinations {
            self.queue_edu(&mut batch, d, edu)?;
        }
        batch.commit()?;
        self.wake.add(destinations);
        Ok(())
    }

    /// A request from `origin` arrived: if we were backing off from it, try again now.
    pub fn server_is_back(&self, origin: &ServerName) {
        let mut dests = self.dests.lock();
        if let Some(d) = dests.get_mut(origin) {
            if d.next_attempt.is_some() {
                d.next_attempt = None;
                d.delay = Duration::ZERO;
                d.pending = true;
                drop(dests);
                self.wake.notify.notify_one();
            }
        }
    }

    /// Destinations to start now, and when the next backoff ends.
    fn schedule(&self, running: usize) -> (Vec<OwnedServerName>, Option<Instant>) {
        let fresh = self.wake.take();
        let now = Instant::now();
        let mut dests = self.dests.lock();
        for d in fresh {
            dests.entry(d).or_default().pending = true;
        }
        let mut slots = CONCURRENT_DESTINATIONS.saturating_sub(running);
        let mut start = Vec::new();
        let mut next_due: Option<Instant> = None;
        for (name, d) in dests.iter_mut() {
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
            if d.pending && slots > 0 {
                slots -= 1;
                d.pending = false;
                d.in_flight = true;
                start.push(name.clone());
            }
        }
        dests.retain(|_, d| d.in_flight || d.pending || d.next_attempt.is_some());
        (start, next_due)
    }

    fn take_retry(&self, destination: &ServerName) -> Option<Txn> {
        self.dests
            .lock()
            .get_mut(destination)
            .and_then(|d| d.retry.take())
    }

    /// A worker is done with `destination` for now.
    fn finish(&self, destination: &ServerName, outcome: Outcome) {
        let mut dests = self.dests.lock();
        let d = dests.entry(destination.to_owned()).or_default();
        d.in_flight = false;
        match outcome {
            Outcome::Idle => {
                d.delay = Duration::ZERO;
                d.retry = None;
            }
            Outcome::More => {
                d.delay = Duration::ZERO;
                d.pending = true;
            }
            Outcome::Failed(txn) => {
                d.delay = next_backoff(d.delay);
                d.next_attempt = Some(Instant::now() + d.delay);
                d.retry = txn;
            }
        }
        drop(dests);
        self.wake.notify.notify_one();
    }

    /// The next transaction for `destination` from its queue, with its body; None when empty.
    fn next_txn(&self, s: &Services, destination: &ServerName) -> Result<Option<TxnWithBody>> {
        let mut txn = Txn {
            id: format!(
                "{}{}",
                self.txn_nonce,
                self.txn_seq.fetch_add(1, Ordering::Relaxed)
            ),
            pdu_keys: Vec::new(),
            edu_keys: Vec::new(),
        };
        let mut size = 0;
        let mut pdus = Vec::new();
        for entry in self
            .storage
            .scan_prefix(
                Table::FederationQueue,
                &keys::prefix(&[destination.as_str(), PDU]),
            )?
            .take(MAX_PDUS_PER_TXN)
        {
            let (k, v) = entry?;
            if size > MAX_TXN_BYTES {
                break;
            }
            if let Some(pdu) = pdu_of(s, &v)? {
                size += serde_json::to_vec(&pdu)?.len();
                pdus.push(pdu);
            }
            txn.pdu_keys.push(k.to_vec());
        }
        let mut edus = Vec::new();
        for entry in self
            .storage
            .scan_prefix(
                Table::FederationQueue,
                &keys::prefix(&[destination.as_str(), EDU]),
            )?
            .take(MAX_EDUS_PER_TXN)
        {
            let (k, v) = entry?;
            if size > MAX_TXN_BYTES {
                break;
            }
            size += v.len();
            if let Ok(edu) = serde_json::from_slice::<Value>(&v) {
                edus.push(edu);
            }
            txn.edu_keys.push(k.to_vec());
        }
        if txn.pdu_keys.is_empty() && txn.edu_keys.is_empty() {
            return Ok(None);
        }
        Ok(Some((txn, pdus, edus)))
    }

    /// The body of a transaction being retried, from its keys (items are deleted only after
    /// success, so they are all still there).
    fn txn_items(&self, s: &Services, txn: &Txn) -> Result<(Vec<Value>, Vec<Value>)> {
        let mut pdus = Vec::new();
        for k in &txn.pdu_keys {
            if let Some(v) = self.storage.get(Table::FederationQueue, k)? {
                if let Some(pdu) = pdu_of(s, &v)? {
                    pdus.push(pdu);
                }
            }
        }
        let mut edus = Vec::new();
        for k in &txn.edu_keys {
            if let Some(v) = self.storage.get(Table::FederationQueue, k)? {
                if let Ok(edu) = serde_json::from_slice::<Value>(&v) {
                    edus.push(edu);
                }
            }
        }
        Ok((pdus, edus))
    }

    fn delete(&self, txn: &Txn) -> Result<()> {
        let mut batch = self.storage.batch();
        for k in txn.pdu_keys.iter().chain(&txn.edu_keys) {
            batch.delete(Table::FederationQueue, k)?;
        }
        batch.commit()
    }

    /// Drop everything queued for `destination` (the policy no longer lets us talk to it).
    fn drop_queue(&self, destination: &ServerName) -> Result<usize> {
        let prefix = keys::prefix(&[destination.as_str()]);
        let mut dropped = 0;
        // Bounded: at most 10,000 rounds of 10,000 items.
        for _ in 0..10_000 {
            let mut batch = self.storage.batch();
            let mut n = 0;
            for entry in self
                .storage
                .scan_prefix(Table::FederationQueue, &prefix)?
                .take(10_000)
            {
                let (k, _) = entry?;
                batch.delete(Table::FederationQueue, &k)?;
                n += 1;
            }
            if n == 0 {
                break;
            }
            batch.commit()?;
            dropped += n;
        }
        Ok(dropped)
    }

    /// Whether `destination` still has a PDU queued whose stream count is at most `count` (PDUs
    /// go out in count order, so none left means every event up to `count` was delivered).
    pub fn pdus_pending_up_to(&self, destination: &ServerName, count: u64) -> Result<bool> {
        let first = self
            .storage
            .scan_prefix(
                Table::FederationQueue,
                &keys::prefix(&[destination.as_str(), PDU]),
            )?
            .next()
            .transpose()?;
        Ok(first
            .and_then(|(k, _)| keys::count_suffix(&k))
            .is_some_and(|c| c <= count))
    }

    /// Number of items queued for `destination` (PDUs, EDUs); for tests and the admin.
    pub fn queued(&self, destination: &ServerName) -> Result<(usize, usize)> {
        let count = |kind: &str| -> Result<usize> {
            let mut n = 0;
            for entry in self.storage.scan_prefix(
                Table::FederationQueue,
                &keys::prefix(&[destination.as_str(), kind]),
            )? {
                entry?;
                n += 1;
            }
            Ok(n)
        };
        Ok((count(PDU)?, count(EDU)?))
    }
}

/// The PDU a queue item names, in its federation form (None if the event is gone).
fn pdu_of(s: &Services, item: &[u8]) -> Result<Option<Value>> {
    let Ok(item) = serde_json::from_slice::<Value>(item) else {
        return Ok(None);
    };
    let Some(id) = item
        .get("event_id")
        .and_then(Value::as_str)
        .and_then(|i| EventId::parse(i).ok())
    else {
        return Ok(None);
    };
    s.rooms.federation_pdu(&id)
}

/// Every destination with queued items, with the highest EDU sequence queued for it. Walks the
/// table by seeking past each destination, not through its items.
fn queued_destinations(storage: &Storage) -> Result<Vec<(OwnedServerName, u64)>> {
    let mut out = Vec::new();
    let mut from: Vec<u8> = Vec::new();
    // Bounded: at most a million destinations.
    for _ in 0..1_000_000 {
        let Some(entry) = storage
            .scan_from(Table::FederationQueue, b"", &from, false)?
            .next()
        else {
            break;
        };
        let (k, _) = entry?;
        let name_len = k.iter().position(|b| *b == keys::SEP).unwrap_or(k.len());
        let name = &k[..name_len];
        let mut edu_max = 0;
        if let Ok(name_str) = std::str::from_utf8(name) {
            if let Some((last, _)) =
                storage.last_with_prefix(Table::FederationQueue, &keys::prefix(&[name_str, EDU]))?
            {
                edu_max = keys::count_suffix(&last).unwrap_or(0);
            }
            match ServerName::parse(name_str) {
                Ok(server) => out.push((server, edu_max)),
                Err(_) => tracing::warn!("federation queue: bad destination {name_str:?}"),
            }
        }
        from = name.to_vec();
        from.extend_from_slice(&[keys::SEP, keys::SEP]);
    }
    Ok(out)
}

/// Run until `shutdown` is set or the services are dropped.
pub async fn run(services: Weak<Services>, mut shutdown: watch::Receiver<bool>) {
    let mut workers: tokio::task::JoinSet<()> = tokio::task::JoinSet::new();
    if let Some(s) = services.upgrade() {
        let storage = s.storage.clone();
        match tokio::task::spawn_blocking(move || queued_destinations(&storage)).await {
            Ok(Ok(dests)) => {
                if !dests.is_empty() {
                    tracing::info!("federation queue: resuming {} destinations", dests.len());
                }
                s.federation
                    .sender
                    .wake
                    .add(dests.into_iter().map(|(d, _)| d));
            }
            Ok(Err(e)) => tracing::warn!("federation queue: reading destinations: {e}"),
            Err(e) => tracing::warn!("federation queue: {e}"),
        }
    }
    let mut last_prune = Instant::now();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let Some(s) = services.upgrade() else { break };
        let sender = &s.federation.sender;
        let (start, next_due) = sender.schedule(workers.len());
        for dest in start {
            workers.spawn(worker(services.clone(), dest));
        }
        if last_prune.elapsed() >= PRUNE_INTERVAL {
            last_prune = Instant::now();
            let storage = s.storage.clone();
            let cutoff = utils::now_ms().saturating_sub(TXN_RETENTION_MS);
            let pruned =
                tokio::task::spawn_blocking(move || prune_txns(&storage, cutoff, 100_000)).await;
            if let Ok(Err(e)) = pruned {
                tracing::warn!("pruning federation transactions: {e}");
            }
        }
        let wake = sender.wake.clone();
        drop(s);
        let sleep = next_due
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(IDLE_TICK)
            .min(IDLE_TICK);
        tokio::select! {
            _ = wake.notify.notified() => {}
            Some(_) = workers.join_next(), if !workers.is_empty() => {}
            _ = tokio::time::sleep(sleep) => {}
            _ = shutdown.changed() => {}
        }
    }
    workers.shutdown().await;
}

async fn worker(services: Weak<Services>, destination: OwnedServerName) {
    let outcome = deliver(&services, &destination).await;
    if let Some(s) = services.upgrade() {
        s.federation.sender.finish(&destination, outcome);
    }
}

/// Send `destination`'s queue, one transaction at a time, until it is empty, a transaction fails
/// or the turn is over.
async fn deliver(services: &Weak<Services>, destination: &ServerName) -> Outcome {
    for _ in 0..ROUNDS_PER_TURN {
        let Some(s) = services.upgrade() else {
            return Outcome::Idle;
        };
        let sender = &s.federation.sender;
        if let Err(e) = s.federation.policy.may_federate_with(destination) {
            match sender.drop_queue(destination) {
                Ok(n) => tracing::warn!(
                    "federation queue: dropped {n} items for {destination}, which the policy refuses: {e}"
                ),
                Err(e) => tracing::warn!("federation queue: dropping {destination}: {e}"),
            }
            return Outcome::Idle;
        }
        let built = match sender.take_retry(destination) {
            Some(txn) => sender.txn_items(&s, &txn).map(|(p, e)| Some((txn, p, e))),
            None => sender.next_txn(&s, destination),
        };
        let (txn, pdus, edus) = match built {
            Ok(Some(t)) => t,
            Ok(None) => return Outcome::Idle,
            Err(e) => {
                tracing::warn!("federation queue for {destination}: {e}");
                return Outcome::Failed(None);
            }
        };
        if pdus.is_empty() && edus.is_empty() {
            // Only items whose events are gone: nothing to send, just forget them.
            if let Err(e) = sender.delete(&txn) {
                tracing::warn!("federation queue for {destination}: {e}");
                return Outcome::Failed(None);
            }
            continue;
        }
        let body = json!({
            "origin": s.globals.server_name,
            "origin_server_ts": utils::now_ms(),
            "pdus": pdus,
            "edus": edus,
        });
        let path = format!("/_matrix/federation/v1/send/{}", txn.id);
        match s
            .federation
            .send(http::Method::PUT, destination, &path, Some(body))
            .await
        {
            Ok(answer) => {
                if let Some(results) = answer.get("pdus").and_then(Value::as_object) {
                    for (id, r) in results.iter().take(MAX_PDUS_PER_TXN) {
                        if let Some(err) = r.get("error") {
                            tracing::info!("{destination} refused {id}: {err}");
                        }
                    }
                }
                if let Err(e) = sender.delete(&txn) {
                    tracing::warn!("federation queue for {destination}: {e}");
                    return Outcome::Failed(Some(txn));
                }
            }
            Err(e) => {
                tracing::info!("transaction {} to {destination} failed: {e}", txn.id);
                return Outcome::Failed(Some(txn));
            }
        }
    }
    Outcome::More
}

/// Delete incoming transaction records older than `cutoff` (ms), looking at most at `limit`.
pub fn prune_txns(storage: &Storage, cutoff: u64, limit: usize) -> Result<usize> {
    let mut batch = storage.batch();
    let mut n = 0;
    for entry in storage.scan_prefix(Table::FederationTxns, b"")?.take(limit) {
        let (k, v) = entry?;
        let ts = serde_json::from_slice::<Value>(&v)
            .ok()
            .and_then(|v| v.get("ts").and_then(Value::as_u64))
            .unwrap_or(0);
        if ts < cutoff {
            batch.delete(Table::FederationTxns, &k)?;
            n += 1;
        }
    }
    if n > 0 {
        batch.commit()?;
    }
    Ok(n)
}
