//! Work in flight, keyed exactly: one request at a time per key, a bounded number per group.
//!
//! Used where a request must not be done twice at once (an incoming `/send` transaction and its
//! retry; two downloads of the same remote media) and where one party must not occupy the
//! server (transactions per origin server, remote media fetches per requesting user). Waiting
//! happens only for the same key: no request can be made to queue behind another's by choosing
//! a key (a lock per hash bucket could be aimed at someone else's bucket), and a group over its
//! limit is told to come back later (429) instead of queueing.

use std::{collections::HashMap, hash::Hash, sync::Arc};

use parking_lot::Mutex;

use crate::error::{Error, Result};

struct Inner<K, G> {
    slots: HashMap<K, Arc<tokio::sync::Mutex<()>>>,
    per_group: HashMap<G, usize>,
}

pub struct InFlight<K, G> {
    inner: Arc<Mutex<Inner<K, G>>>,
    per_group_limit: usize,
}

/// Held while the work for its key is done; dropping it frees the key and the group's count.
pub struct Slot<K: Eq + Hash, G: Eq + Hash> {
    inner: Arc<Mutex<Inner<K, G>>>,
    key: K,
    group: G,
    /// The key's mutex, as the map held it when this slot was counted.
    mutex: Arc<tokio::sync::Mutex<()>>,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl<K: Eq + Hash + Clone, G: Eq + Hash + Clone> InFlight<K, G> {
    /// At most `per_group_limit` slots held or awaited per group.
    pub fn new(per_group_limit: usize) -> Self {
        InFlight {
            inner: Arc::new(Mutex::new(Inner {
                slots: HashMap::new(),
                per_group: HashMap::new(),
            })),
            per_group_limit,
        }
    }

    /// Wait until no other holder has `key`, then hold it. 429 `M_LIMIT_EXCEEDED` when `group`
    /// already holds or waits for its limit.
    pub async fn acquire(&self, key: K, group: G) -> Result<Slot<K, G>> {
        let mutex = {
            let mut inner = self.inner.lock();
            let count = inner.per_group.entry(group.clone()).or_insert(0);
            if *count >= self.per_group_limit {
                if *count == 0 {
                    inner.per_group.remove(&group);
                }
                return Err(Error::RateLimited {
                    retry_after_ms: 1000,
                });
            }
            *count += 1;
            inner.slots.entry(key.clone()).or_default().clone()
        };
        // Counted from here on: dropping the holder gives the count back, also when the future
        // is dropped while it waits.
        let mut slot = Slot {
            inner: self.inner.clone(),
            key,
            group,
            mutex,
            held: None,
        };
        slot.held = Some(slot.mutex.clone().lock_owned().await);
        Ok(slot)
    }

    /// Keys with a holder or waiters (tests, metrics).
    pub fn len(&self) -> usize {
        self.inner.lock().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Eq + Hash, G: Eq + Hash> Drop for Slot<K, G> {
    fn drop(&mut self) {
        // Give the key up first, so that only references of others remain to be counted.
        drop(self.held.take());
        let mut inner = self.inner.lock();
        if let Some(n) = inner.per_group.get_mut(&self.group) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.per_group.remove(&self.group);
            }
        }
        // Only this slot's own mutex, and only when the map's reference and this slot's are
        // the last: then nobody holds or waits for the key. (A wait given up while another
        // request holds the key must not remove the entry under the holder: the next request
        // would get a new mutex and run beside it.)
        if inner
            .slots
            .get(&self.key)
            .is_some_and(|m| Arc::ptr_eq(m, &self.mutex) && Arc::strong_count(m) == 2)
        {
            inner.slots.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn same_key_waits_other_keys_do_not_and_groups_are_bounded() {
        let slots: InFlight<&str, &str> = InFlight::new(2);
        let first = slots.acquire("t1", "a").await.expect("free");
        // Another key of the same group is not held up by the first.
        let other = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            slots.acquire("t2", "a"),
        )
        .await
        .expect("not blocked")
        .expect("under the limit");
        // The group is at its limit now: refused at once, not queued.
        let refused = slots.acquire("t3", "a").await;
        assert!(matches!(refused, Err(Error::RateLimited { .. })));
        // Another group is unaffected.
        drop(slots.acquire("t3", "b").await.expect("other group"));
        drop(other);
        // The same key waits for its holder.
        let waiting = slots.acquire("t1", "c");
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(100), &mut waiting)
                .await
                .is_err(),
            "a second holder of the same key got in"
        );
        drop(first);
        let second = waiting.await.expect("free after the first");
        drop(second);
        assert!(slots.is_empty());
        assert!(slots.inner.lock().per_group.is_empty());
    }

    #[tokio::test]
    async fn an_abandoned_wait_leaves_the_holder_alone() {
        let slots: InFlight<&str, &str> = InFlight::new(4);
        let holder = slots.acquire("txn", "origin").await.expect("free");
        // A retry that waits, then is given up (its connection closed).
        let gave_up = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            slots.acquire("txn", "origin"),
        )
        .await;
        assert!(gave_up.is_err());
        // A third attempt must still wait for the holder, not run beside it.
        let third = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            slots.acquire("txn", "origin"),
        )
        .await;
        assert!(third.is_err(), "a second holder of the same key got in");
        drop(holder);
        let after = slots.acquire("txn", "origin").await.expect("free again");
        drop(after);
        assert!(slots.is_empty());
    }

    #[tokio::test]
    async fn an_abandoned_wait_gives_its_count_back() {
        let slots: InFlight<&str, &str> = InFlight::new(1);
        let held = slots.acquire("k", "a").await.expect("free");
        let wait = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            slots.acquire("k", "b"),
        )
        .await;
        assert!(wait.is_err(), "waited for the holder");
        assert!(!slots.inner.lock().per_group.contains_key("b"));
        drop(held);
        assert!(slots.is_empty());
    }
}
