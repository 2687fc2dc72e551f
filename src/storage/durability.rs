//! Group commit: one thread makes the WAL durable for everybody.
//!
//! Writers apply their batch without fsync and then wait for a [`WriteTicket`] (the RocksDB
//! sequence number of their write) to be covered by an fsync. A single syncer thread runs the
//! fsyncs back to back: each one covers every write applied before it started, so under load one
//! fsync acknowledges many writes, and a waiting request costs no thread of its own (an earlier
//! design ran each wait on tokio's blocking pool: one thread wake-up and lock hand-off per request).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Weak,
    },
    thread::JoinHandle,
    time::Duration,
};

use tokio::sync::watch;

use crate::error::{Error, Result};

/// A write applied but perhaps not yet on disk: wait for it with `Storage::durable` before
/// acknowledging anything that depends on it.
#[derive(Clone, Copy, Debug)]
pub struct WriteTicket(pub(super) u64);

/// What the syncer has achieved so far.
#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    /// Highest sequence number known to be on disk.
    synced: u64,
    /// How many fsyncs have failed; a waiter that sees this change gets an error.
    failures: u64,
}

/// The syncer thread and what waiters share with it.
pub(super) struct Syncer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    /// Highest ticket anybody waits for.
    wanted: AtomicU64,
    /// Mirrors `progress.synced`, for a wait-free fast path.
    synced: AtomicU64,
    stop: AtomicBool,
    progress: watch::Sender<Progress>,
    /// Test hook ([`SyncHold`]): while above zero, no fsync starts, so a test can look at what
    /// happens before a write is durable.
    held: AtomicUsize,
}

/// While alive, no WAL fsync starts (neither the syncer's nor a blocking caller's): a test
/// hook to observe what is answered before a write is on disk. Dropping it lets them run.
pub struct SyncHold {
    shared: Arc<Shared>,
    thread: Option<std::thread::Thread>,
}

impl Drop for SyncHold {
    fn drop(&mut self) {
        self.shared.held.fetch_sub(1, Ordering::AcqRel);
        if let Some(t) = &self.thread {
            t.unpark();
        }
    }
}

/// How often a held syncer looks again.
const HOLD_POLL: Duration = Duration::from_millis(5);

impl Syncer {
    /// Start the thread. It holds the database only weakly, so dropping the last `Storage`
    /// closes the database (the thread is stopped and joined first).
    pub(super) fn start(db: Weak<rocksdb::DB>) -> std::io::Result<Syncer> {
        let shared = Arc::new(Shared {
            wanted: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            progress: watch::Sender::new(Progress::default()),
            held: AtomicUsize::new(0),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("hafen-wal-sync".into())
                .spawn(move || run(&shared, &db))?
        };
        Ok(Syncer {
            shared,
            thread: Some(thread),
        })
    }

    pub(super) fn is_synced(&self, ticket: WriteTicket) -> bool {
        self.shared.synced.load(Ordering::Acquire) >= ticket.0
    }

    /// Wait until `ticket` is on disk.
    pub(super) async fn wait(&self, ticket: WriteTicket) -> Result<()> {
        if self.is_synced(ticket) {
            return Ok(());
        }
        let mut progress = self.shared.progress.subscribe();
        let failures_before = progress.borrow().failures;
        self.request(ticket);
        let state = progress
            .wait_for(|p| p.synced >= ticket.0 || p.failures != failures_before)
            .await
            .map_err(|_| Error::internal("the WAL sync thread has stopped"))?;
        if state.synced >= ticket.0 {
            Ok(())
        } else {
            Err(Error::internal("writing the database log to disk failed"))
        }
    }

    /// Hold every fsync until the returned guard is dropped (test hook).
    pub(super) fn hold(&self) -> SyncHold {
        self.shared.held.fetch_add(1, Ordering::AcqRel);
        SyncHold {
            shared: self.shared.clone(),
            thread: self.thread.as_ref().map(|t| t.thread().clone()),
        }
    }

    /// The blocking form of [`Syncer::wait`], for callers outside the async runtime (the CLI):
    /// the calling thread runs the fsync itself, and whoever waits on the syncer is woken by it
    /// too. Never call it on an async worker: use [`Syncer::wait`].
    pub(super) fn sync_blocking(&self, db: &rocksdb::DB, ticket: WriteTicket) -> Result<()> {
        if self.is_synced(ticket) {
            return Ok(());
        }
        while self.shared.held.load(Ordering::Acquire) > 0 {
            std::thread::sleep(HOLD_POLL);
        }
        let upto = db.latest_sequence_number();
        db.flush_wal(true)?;
        self.shared.mark_synced(upto);
        Ok(())
    }

    fn request(&self, ticket: WriteTicket) {
        self.shared.wanted.fetch_max(ticket.0, Ordering::AcqRel);
        if let Some(t) = &self.thread {
            // Cheap when the thread is busy: it re-checks `wanted` before parking.
            t.thread().unpark();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Shared {
    /// Everything up to `upto` is on disk: publish it and wake the waiters it covers.
    fn mark_synced(&self, upto: u64) {
        self.synced.fetch_max(upto, Ordering::AcqRel);
        self.progress.send_modify(|p| p.synced = p.synced.max(upto));
    }
}

fn run(shared: &Shared, db: &Weak<rocksdb::DB>) {
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        if shared.held.load(Ordering::Acquire) > 0 {
            std::thread::park_timeout(HOLD_POLL);
            continue;
        }
        let synced = shared.synced.load(Ordering::Acquire);
        if shared.wanted.load(Ordering::Acquire) <= synced {
            // A request that arrives between the check and here leaves an unpark token, so
            // park returns at once: no wake-up is lost.
            std::thread::park();
            continue;
        }
        let Some(db) = db.upgrade() else { return };
        // Everything applied up to here is in the WAL buffer; the fsync below covers it.
        let upto = db.latest_sequence_number();
        match db.flush_wal(true) {
            Ok(()) => {
                shared.synced.fetch_max(upto, Ordering::AcqRel);
                shared
                    .progress
                    .send_modify(|p| p.synced = p.synced.max(upto));
            }
            Err(e) => {
                tracing::error!(error = %e, "fsync of the database log failed");
                shared.progress.send_modify(|p| p.failures += 1);
                drop(db);
                // Do not spin on a failing disk.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
