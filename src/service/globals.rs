//! Server-wide facts: the global stream position, who to wake when it moves, and the signing key.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use parking_lot::Mutex;
use ruma::{OwnedServerName, OwnedUserId, UserId};
use tokio::sync::watch;

use crate::{
    error::{Error, Result},
    storage::{Storage, Table},
};

/// Counts are reserved on disk in blocks, so a restart never hands out a count that an already
/// committed write used, without a durable write per count.
const RESERVE_BLOCK: u64 = 1000;
const COUNTER_KEY: &[u8] = b"counter_reserved";

/// The global stream position.
///
/// Every change a client can see gets a count from [`StreamCounter::next`]. Writers commit in
/// parallel, so count 6 can be durable before count 5; readers must not skip 5. The *watermark*
/// is the highest count below which every count is finished; sync reads only up to it, and users
/// are woken only when the watermark passes the counts that concern them.
pub struct StreamCounter {
    storage: Storage,
    state: Mutex<CounterState>,
    notifier: Notifier,
    /// The watermark, for whoever waits for a count to be passed ([`StreamCounter::passed`]).
    mark: watch::Sender<u64>,
}

struct CounterState {
    last: u64,
    reserved: u64,
    pending: BTreeSet<u64>,
    /// Finished counts above the watermark, with the users to wake once it passes them.
    finished_waiting: BTreeMap<u64, Vec<OwnedUserId>>,
    watermark: u64,
}

/// A count handed out and not yet finished. Dropping it (e.g. on an error path) finishes it
/// without waking anybody.
pub struct PendingCount<'a> {
    counter: &'a StreamCounter,
    count: u64,
    done: bool,
}

impl PendingCount<'_> {
    pub fn get(&self) -> u64 {
        self.count
    }

    /// The write with this count is durable; wake `users` once every earlier count is too.
    pub fn finish(mut self, users: Vec<OwnedUserId>) {
        self.done = true;
        self.counter.finish(self.count, users);
    }
}

impl Drop for PendingCount<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.counter.finish(self.count, Vec::new());
        }
    }
}

impl StreamCounter {
    pub fn load(storage: Storage) -> Result<StreamCounter> {
        let reserved = storage
            .get(Table::Global, COUNTER_KEY)?
            .and_then(|v| crate::storage::keys::u64_value(&v))
            .unwrap_or(0);
        Ok(StreamCounter {
            storage,
            state: Mutex::new(CounterState {
                last: reserved,
                reserved,
                pending: BTreeSet::new(),
                finished_waiting: BTreeMap::new(),
                watermark: reserved,
            }),
            notifier: Notifier::default(),
            mark: watch::Sender::new(reserved),
        })
    }

    pub fn next(&self) -> Result<PendingCount<'_>> {
        let mut s = self.state.lock();
        let count = s.last + 1;
        if count > s.reserved {
            let reserved = s.reserved + RESERVE_BLOCK;
            self.storage
                .put(Table::Global, COUNTER_KEY, &reserved.to_be_bytes())?;
            s.reserved = reserved;
        }
        s.last = count;
        s.pending.insert(count);
        Ok(PendingCount {
            counter: self,
            count,
            done: false,
        })
    }

    /// Every count up to this one is finished: reads up to here see a complete history.
    pub fn watermark(&self) -> u64 {
        self.state.lock().watermark
    }

    /// Wait until the watermark has passed `count`: the write with that count is durable and
    /// every reader (sync) sees it.
    pub async fn passed(&self, count: u64) {
        let mut rx = self.mark.subscribe();
        // The sender lives as long as `self`, which outlives this borrow.
        let _ = rx.wait_for(|mark| *mark >= count).await;
    }

    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    fn finish(&self, count: u64, users: Vec<OwnedUserId>) {
        let mut wake = Vec::new();
        let watermark = {
            let mut s = self.state.lock();
            s.pending.remove(&count);
            s.finished_waiting.insert(count, users);
            let new_mark = match s.pending.first() {
                Some(first_pending) => first_pending - 1,
                None => s.last,
            };
            s.watermark = s.watermark.max(new_mark);
            let mark = s.watermark;
            while let Some(entry) = s.finished_waiting.first_entry() {
                if *entry.key() > mark {
                    break;
                }
                wake.extend(entry.remove());
            }
            mark
        };
        self.mark.send_if_modified(|m| {
            let moved = *m < watermark;
            *m = (*m).max(watermark);
            moved
        });
        self.notifier.wake(wake.iter().map(|u| &**u), watermark);
    }
}

/// Per-user wake-ups for long-polling `/sync`: only the users an event concerns are woken.
#[derive(Default)]
pub struct Notifier {
    senders: Mutex<HashMap<OwnedUserId, watch::Sender<u64>>>,
}

impl Notifier {
    pub fn subscribe(&self, user: &UserId) -> watch::Receiver<u64> {
        let mut map = self.senders.lock();
        map.entry(user.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn wake<'a>(&self, users: impl Iterator<Item = &'a UserId>, position: u64) {
        let mut map = self.senders.lock();
        for user in users {
            if let Some(tx) = map.get(user) {
                if tx.receiver_count() == 0 {
                    map.remove(user);
                } else {
                    tx.send_replace(position);
                }
            }
        }
    }
}

/// The server's ed25519 signing key, made on first start and kept in the database.
pub struct SigningKey {
    pub key_id: String,
    pub keypair: ruma::signatures::Ed25519KeyPair,
}

/// A key the server signed with before a rotation: still published (`old_verify_keys`) so that
/// what it signed can be verified.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct OldKey {
    /// Unpadded base64 of the public key.
    pub key: String,
    pub expired_ts: u64,
}

/// `Global` rows: the current key (`version:base64(pkcs8)`) and the old public keys (JSON map).
const SIGNING_KEY: &[u8] = b"signing_key";
const OLD_SIGNING_KEYS: &[u8] = b"old_signing_keys";

impl SigningKey {
    pub fn load_or_create(storage: &Storage) -> Result<SigningKey> {
        let (version, der) = match storage.get(Table::Global, SIGNING_KEY)? {
            Some(bytes) => {
                let text = String::from_utf8(bytes).map_err(Error::internal)?;
                let (version, b64) = text
                    .split_once(':')
                    .ok_or_else(|| Error::internal("bad signing key"))?;
                (version.to_owned(), base64_decode(b64)?)
            }
            None => {
                let mut batch = storage.batch();
                let made = Self::store_new(&mut batch)?;
                batch.commit()?;
                made
            }
        };
        let keypair = ruma::signatures::Ed25519KeyPair::from_der(&der, version.clone())
            .map_err(|e| Error::internal(format!("signing key: {e}")))?;
        Ok(SigningKey {
            key_id: format!("ed25519:{version}"),
            keypair,
        })
    }

    /// A fresh key, put into `batch` as the current one.
    fn store_new(batch: &mut crate::storage::Batch) -> Result<(String, Vec<u8>)> {
        let der = ruma::signatures::Ed25519KeyPair::generate();
        let version: String = crate::utils::random_string(6);
        let value = format!("{version}:{}", base64_encode(&der));
        batch.put(Table::Global, SIGNING_KEY, value.as_bytes())?;
        Ok((version, der.to_vec()))
    }

    /// Unpadded base64 of the public key.
    pub fn public_key(&self) -> String {
        base64_encode(&self.keypair.public_key())
    }

    /// Keys signed with before rotations, by key id.
    pub fn old_keys(storage: &Storage) -> Result<std::collections::BTreeMap<String, OldKey>> {
        Ok(storage
            .get_json(Table::Global, OLD_SIGNING_KEYS)?
            .unwrap_or_default())
    }

    /// Replace the current key by a new one; the current one becomes an old key that expired
    /// now. Run while the server is stopped (`hafen key rotate`). Returns the new key id.
    pub fn rotate(storage: &Storage) -> Result<String> {
        let current = SigningKey::load_or_create(storage)?;
        let mut old = SigningKey::old_keys(storage)?;
        old.insert(
            current.key_id.clone(),
            OldKey {
                key: current.public_key(),
                expired_ts: crate::utils::now_ms(),
            },
        );
        let mut batch = storage.batch();
        batch.put(Table::Global, OLD_SIGNING_KEYS, &serde_json::to_vec(&old)?)?;
        let (version, _) = Self::store_new(&mut batch)?;
        batch.commit()?;
        Ok(format!("ed25519:{version}"))
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

fn base64_decode(text: &str) -> Result<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(text)
        .map_err(Error::internal)
}

/// Facts every service needs: the server name and key.
pub struct Globals {
    pub server_name: OwnedServerName,
    pub signing_key: SigningKey,
    pub counter: Arc<StreamCounter>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> (tempfile::TempDir, StreamCounter) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 8, false).unwrap();
        (dir, StreamCounter::load(storage).unwrap())
    }

    #[test]
    fn watermark_waits_for_slower_writers() {
        let (_dir, c) = counter();
        let first = c.next().unwrap();
        let second = c.next().unwrap();
        assert_eq!((first.get(), second.get()), (1, 2));
        let alice: OwnedUserId = "@alice:x".try_into().unwrap();
        let mut rx = c.notifier().subscribe(&alice);
        second.finish(vec![alice.clone()]);
        // Count 2 is durable but 1 is not: readers must not see past 0, nor be woken yet.
        assert_eq!(c.watermark(), 0);
        assert!(!rx.has_changed().unwrap());
        first.finish(vec![]);
        assert_eq!(c.watermark(), 2);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 2);
    }

    #[test]
    fn dropped_count_does_not_block_the_watermark() {
        let (_dir, c) = counter();
        let failed = c.next().unwrap();
        let ok = c.next().unwrap();
        drop(failed);
        ok.finish(vec![]);
        assert_eq!(c.watermark(), 2);
    }

    #[test]
    fn restart_never_reuses_a_count() {
        let dir = tempfile::tempdir().unwrap();
        let last = {
            let storage = Storage::open(dir.path(), 8, false).unwrap();
            let c = StreamCounter::load(storage).unwrap();
            let mut last = 0;
            for _ in 0..1500 {
                let p = c.next().unwrap();
                last = p.get();
                p.finish(vec![]);
            }
            last
        };
        let storage = Storage::open(dir.path(), 8, false).unwrap();
        let c = StreamCounter::load(storage).unwrap();
        let next = c.next().unwrap();
        assert!(next.get() > last, "{} <= {last}", next.get());
        assert!(c.watermark() >= last);
    }
}
