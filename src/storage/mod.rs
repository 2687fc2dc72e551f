//! Storage: the only module that knows RocksDB.
//!
//! The rest of Hafen sees a narrow key-value interface: named tables (RocksDB column families),
//! `get`, prefix and range scans, and atomic [`Batch`] writes. Every client-visible change is one
//! batch, written with the WAL (and fsync when `database_sync_writes` is on) before the client gets
//! an answer, so a crash never loses an acknowledged write nor leaves half of one.

mod durability;
pub mod keys;
pub mod schema;
mod tables;

use std::{path::Path, sync::Arc};

pub use durability::{SyncHold, WriteTicket};
pub use tables::Table;

/// One stored entry: its key and its value.
pub type Row = (Box<[u8]>, Box<[u8]>);

use crate::error::{Error, Result};

/// An open database. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Storage {
    // Declared before `syncer`: dropping the last clone releases this first, then stops and
    // joins the syncer thread, which closes the database.
    db: Arc<rocksdb::DB>,
    sync_writes: bool,
    /// Group commit (see [`durability`]); `None` when `database_sync_writes` is off.
    syncer: Option<Arc<durability::Syncer>>,
}

/// Why opening failed, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the database at {0} is in use by another Hafen process (stop the server first)")]
    Locked(String),
    #[error("cannot open the database at {path}: {message}")]
    Other { path: String, message: String },
}

/// Largest MANIFEST before RocksDB starts a new one (at its next change of the file set). One
/// byte: every change starts a new one, so no old file boundary (a key) outlives its file.
const MAX_MANIFEST_BYTES: usize = 1;

impl Storage {
    /// Open (or create) the database with LZ4-compressed tables.
    pub fn open(path: &Path, cache_mb: u64, sync_writes: bool) -> Result<Storage, OpenError> {
        Self::open_with(path, cache_mb, sync_writes, true)
    }

    /// [`Storage::open`], choosing whether new table files are compressed (`compress`; files
    /// written either way stay readable).
    pub fn open_with(
        path: &Path,
        cache_mb: u64,
        sync_writes: bool,
        compress: bool,
    ) -> Result<Storage, OpenError> {
        let compression = if compress {
            rocksdb::DBCompressionType::Lz4
        } else {
            rocksdb::DBCompressionType::None
        };
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_open_files(512);
        opts.set_keep_log_file_num(5);
        opts.increase_parallelism(2);
        let cache = rocksdb::Cache::new_lru_cache((cache_mb as usize).max(8) * 1024 * 1024);
        let mut table_opts = rocksdb::BlockBasedOptions::default();
        table_opts.set_block_cache(&cache);
        table_opts.set_bloom_filter(10.0, false);
        opts.set_block_based_table_factory(&table_opts);
        opts.set_compression_type(compression);

        // Memtables: small per table, and one budget for all of them, so that two dozen tables
        // do not each hold a 64 MiB write buffer.
        opts.set_db_write_buffer_size(32 * 1024 * 1024);
        // A WAL file is deleted only when every table with data in it has flushed. Rarely written
        // tables (users, aliases) would keep gigabytes of old WAL alive; past this size RocksDB
        // flushes them. (The scale run measured about 1 KB of WAL per message without it.)
        opts.set_max_total_wal_size(64 * 1024 * 1024);
        // The MANIFEST (RocksDB's log of which SST files exist) records each file's smallest and
        // largest key, so a deleted key can live on there after its files are compacted away.
        // With this limit every change of the file set starts a new MANIFEST holding only the
        // live files (a snapshot of a few KiB per table) and the old one is deleted;
        // `erase_deleted` ends with such a change.
        opts.set_max_manifest_file_size(MAX_MANIFEST_BYTES);
        let cfs = Table::ALL.iter().map(|t| {
            let mut cf_opts = rocksdb::Options::default();
            cf_opts.set_write_buffer_size(4 * 1024 * 1024);
            cf_opts.set_block_based_table_factory(&table_opts);
            cf_opts.set_compression_type(compression);
            rocksdb::ColumnFamilyDescriptor::new(t.name(), cf_opts)
        });
        let db = rocksdb::DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| {
            let message = e.to_string();
            if message.contains("lock") || message.contains("LOCK") {
                OpenError::Locked(path.display().to_string())
            } else {
                OpenError::Other {
                    path: path.display().to_string(),
                    message,
                }
            }
        })?;
        let db = Arc::new(db);
        let syncer = if sync_writes {
            let syncer =
                durability::Syncer::start(Arc::downgrade(&db)).map_err(|e| OpenError::Other {
                    path: path.display().to_string(),
                    message: format!("cannot start the WAL sync thread: {e}"),
                })?;
            Some(Arc::new(syncer))
        } else {
            None
        };
        Ok(Storage {
            db,
            sync_writes,
            syncer,
        })
    }

    fn cf(&self, table: Table) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(table.name())
            .ok_or_else(|| Error::internal(format!("missing column family {}", table.name())))
    }

    pub fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(table)?, key)?)
    }

    /// The value under `key`, read as JSON.
    pub fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        table: Table,
        key: &[u8],
    ) -> Result<Option<T>> {
        match self.get(table, key)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    pub fn contains(&self, table: Table, key: &[u8]) -> Result<bool> {
        Ok(self.db.get_pinned_cf(self.cf(table)?, key)?.is_some())
    }

    /// All entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix<'a>(
        &'a self,
        table: Table,
        prefix: &[u8],
    ) -> Result<impl Iterator<Item = Result<Row>> + 'a> {
        let prefix = prefix.to_vec();
        let iter = self.db.iterator_cf(
            self.cf(table)?,
            rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        );
        Ok(iter
            .map(|r| r.map_err(Error::from))
            .take_while(move |r| match r {
                Ok((k, _)) => k.starts_with(&prefix),
                Err(_) => true,
            }))
    }

    /// Entries with `prefix`, starting at `from` (inclusive) and walking forward or backward.
    pub fn scan_from<'a>(
        &'a self,
        table: Table,
        prefix: &[u8],
        from: &[u8],
        backward: bool,
    ) -> Result<impl Iterator<Item = Result<Row>> + 'a> {
        let prefix = prefix.to_vec();
        let dir = if backward {
            rocksdb::Direction::Reverse
        } else {
            rocksdb::Direction::Forward
        };
        let iter = self
            .db
            .iterator_cf(self.cf(table)?, rocksdb::IteratorMode::From(from, dir));
        Ok(iter
            .map(|r| r.map_err(Error::from))
            .take_while(move |r| match r {
                Ok((k, _)) => k.starts_with(&prefix),
                Err(_) => true,
            }))
    }

    /// The last entry with `prefix` (largest key), if any.
    pub fn last_with_prefix(&self, table: Table, prefix: &[u8]) -> Result<Option<Row>> {
        let mut upper = prefix.to_vec();
        upper.extend_from_slice(&[0xff; 9]);
        self.scan_from(table, prefix, &upper, true)?
            .next()
            .transpose()
    }

    /// For every group of keys under `prefix` whose keys end in a big-endian count (a group: the
    /// keys equal but for those last 8 bytes), the entry with the largest count `<= max_count`.
    /// Two seeks per group on one iterator, whatever the number of entries in a group: this is
    /// how "the value of each key as of a position" is read from a per-key log.
    pub fn latest_per_group(
        &self,
        table: Table,
        prefix: &[u8],
        max_count: u64,
    ) -> Result<Vec<Row>> {
        let mut iter = self.db.raw_iterator_cf(self.cf(table)?);
        let mut out = Vec::new();
        iter.seek(prefix);
        loop {
            let group = match iter.key() {
                Some(k) if k.starts_with(prefix) && k.len() >= prefix.len() + 8 => {
                    k[..k.len() - 8].to_vec()
                }
                Some(k) if k.starts_with(prefix) => {
                    // Not a counted key (cannot happen in a per-key log): step over it.
                    iter.next();
                    continue;
                }
                _ => break,
            };
            let mut at = group.clone();
            at.extend_from_slice(&max_count.to_be_bytes());
            iter.seek_for_prev(&at);
            if let (Some(k), Some(v)) = (iter.key(), iter.value()) {
                if k.len() == group.len() + 8 && k.starts_with(&group) {
                    out.push((k.into(), v.into()));
                }
            }
            // On to the next group: past the largest key this group can have.
            let mut past = group;
            past.extend_from_slice(&[0xff; 8]);
            iter.seek(&past);
            if iter.key() == Some(past.as_slice()) {
                iter.next();
            }
        }
        iter.status()?;
        Ok(out)
    }

    pub fn batch(&self) -> Batch {
        Batch {
            storage: self.clone(),
            inner: rocksdb::WriteBatch::default(),
        }
    }

    /// Write one key outside of a batch (still durable before return).
    pub fn put(&self, table: Table, key: &[u8], value: &[u8]) -> Result<()> {
        let mut b = self.batch();
        b.put(table, key, value)?;
        b.commit()
    }

    /// Block until the write behind `ticket` is on disk (for callers outside the async runtime).
    pub fn make_durable(&self, ticket: WriteTicket) -> Result<()> {
        match &self.syncer {
            Some(syncer) => syncer.sync_blocking(&self.db, ticket),
            None => Ok(()),
        }
    }

    /// Wait until the write behind `ticket` is on disk. Concurrent writers share one fsync
    /// (group commit, see [`durability`]).
    pub async fn durable(&self, ticket: WriteTicket) -> Result<()> {
        match &self.syncer {
            Some(syncer) => syncer.wait(ticket).await,
            None => Ok(()),
        }
    }

    /// Test hook: no WAL fsync starts while the returned guard lives (`None` without
    /// `database_sync_writes`), so a test can see what is answered before a write is durable.
    #[doc(hidden)]
    pub fn hold_wal_sync(&self) -> Option<SyncHold> {
        self.syncer.as_ref().map(|s| s.hold())
    }

    /// A ticket covering every write applied so far.
    pub fn ticket_now(&self) -> WriteTicket {
        WriteTicket(self.db.latest_sequence_number())
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// Write every table's memtable to its SST files and wait for it. Afterwards no write-ahead
    /// log file holds anything the tables do not: RocksDB starts a new log at the flush and
    /// deletes the old ones (logs are neither recycled nor archived here), so a value that was
    /// overwritten or deleted before the flush is no longer in any log file.
    pub fn flush_all(&self) -> Result<()> {
        let cfs = Table::ALL
            .iter()
            .map(|t| self.cf(*t))
            .collect::<Result<Vec<_>>>()?;
        let mut opts = rocksdb::FlushOptions::default();
        opts.set_wait(true);
        self.db.flush_cfs_opt(&cfs, &opts)?;
        // The default column family (unused by Hafen, always there) too, so that nothing keeps
        // an old log alive.
        self.db.flush_opt(&opts)?;
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// Compact the keys of `table` in `[from, to]` (`None`: from the first / to the last key)
    /// down to the last level, so that overwritten values and deleted keys are dropped from the
    /// SST files (a delete only writes a tombstone; the old value stays on disk until a
    /// compaction meets both). Blocking: call from a blocking thread.
    pub fn compact_range(
        &self,
        table: Table,
        from: Option<&[u8]>,
        to: Option<&[u8]>,
    ) -> Result<()> {
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_exclusive_manual_compaction(true);
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        self.db
            .compact_range_cf_opt(self.cf(table)?, from, to, &opts);
        Ok(())
    }

    /// Make deletions physical: flush every memtable (old log files go), then compact `tables`
    /// whole (old SST versions go), then flush again. Once this returns, a value deleted or
    /// overwritten before the call is in no file of the database directory. This is the
    /// physical-deletion step of retention, admin purges, room deletion and erasure. Blocking.
    pub fn erase_deleted(&self, tables: &[Table]) -> Result<()> {
        self.flush_all()?;
        for table in tables {
            self.compact_range(*table, None, None)?;
        }
        // Deleted keys can still be in the MANIFEST as the boundaries of files that are gone:
        // one more flush (of a marker row, so there is something to flush) changes the file set
        // after the compactions, which starts a new MANIFEST of the live files only (see
        // `MAX_MANIFEST_BYTES`) and deletes the old one.
        self.put(
            Table::Global,
            b"last_physical_erase",
            &crate::utils::now_ms().to_be_bytes(),
        )?;
        self.flush_all()
    }

    /// A consistent copy of the whole database at this moment into `dest` (which must not exist),
    /// taken while the server runs: RocksDB hard-links the immutable table files and copies the
    /// rest, after flushing. Blocking: call from a blocking thread.
    pub fn checkpoint(&self, dest: &Path) -> Result<()> {
        let checkpoint = rocksdb::checkpoint::Checkpoint::new(&*self.db)?;
        checkpoint.create_checkpoint(dest)?;
        Ok(())
    }

    /// [`Storage::erase_deleted`] over every table.
    pub fn compact_all(&self) -> Result<()> {
        self.erase_deleted(Table::ALL)
    }
}

/// An atomic set of writes. Nothing is visible until [`Batch::commit`]; then all of it is.
pub struct Batch {
    storage: Storage,
    inner: rocksdb::WriteBatch,
}

impl Batch {
    pub fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<()> {
        let cf = self.storage.cf(table)?;
        self.inner.put_cf(cf, key, value);
        Ok(())
    }

    pub fn delete(&mut self, table: Table, key: &[u8]) -> Result<()> {
        let cf = self.storage.cf(table)?;
        self.inner.delete_cf(cf, key);
        Ok(())
    }

    /// Delete every key `from <= key < to` (one range tombstone, however many keys).
    pub fn delete_range(&mut self, table: Table, from: &[u8], to: &[u8]) -> Result<()> {
        let cf = self.storage.cf(table)?;
        self.inner.delete_range_cf(cf, from, to);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// Apply the batch at once (atomically, through the WAL) without waiting for the disk.
    /// Readers see it immediately; acknowledge it only after [`Storage::durable`].
    pub fn commit_deferred(self) -> Result<WriteTicket> {
        self.storage.db.write(self.inner)?;
        Ok(WriteTicket(self.storage.db.latest_sequence_number()))
    }

    /// Apply the batch and, with `database_sync_writes`, fsync it before returning. Room events
    /// use [`Batch::commit_deferred`] and the syncer instead; for the rest (accounts, account
    /// data, audit entries), an fsync on an async worker first hands that worker's other tasks
    /// to the rest of the pool, so a slow disk delays this request only.
    pub fn commit(self) -> Result<()> {
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(self.storage.sync_writes);
        let write = || self.storage.db.write_opt(self.inner, &opts);
        match tokio::runtime::Handle::try_current() {
            Ok(h)
                if self.storage.sync_writes
                    && h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread =>
            {
                tokio::task::block_in_place(write)?
            }
            _ => write()?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{keys, Storage, Table};

    #[test]
    fn latest_per_group_reads_each_key_as_of_a_count() {
        let dir = tempfile::tempdir().expect("dir");
        let storage = Storage::open(dir.path(), 8, false).expect("open");
        let mut batch = storage.batch();
        // Two keys where one is a prefix of the other, a removed key, another room.
        for (parts, count, value) in [
            (["!r", "t", "a"], 1u64, "a1"),
            (["!r", "t", "a"], 5, "a5"),
            (["!r", "t", "a"], 9, "a9"),
            (["!r", "t", "ab"], 3, "ab3"),
            (["!r", "t", "gone"], 2, "g2"),
            (["!r", "t", "gone"], 4, ""),
            (["!r", "u", ""], 6, "u6"),
            (["!r2", "t", "a"], 1, "other room"),
        ] {
            batch
                .put(
                    Table::StateByKey,
                    &keys::with_count(&parts, count),
                    value.as_bytes(),
                )
                .expect("put");
        }
        batch.commit().expect("commit");
        let at = |prefix: &[&str], count: u64| -> Vec<String> {
            let mut got: Vec<String> = storage
                .latest_per_group(Table::StateByKey, &keys::prefix(prefix), count)
                .expect("read")
                .into_iter()
                .map(|(_, v)| String::from_utf8(v.to_vec()).expect("utf8"))
                .collect();
            got.sort();
            got
        };
        assert_eq!(at(&["!r"], 0), Vec::<String>::new());
        assert_eq!(at(&["!r"], 2), vec!["a1", "g2"]);
        assert_eq!(at(&["!r"], 4), vec!["", "a1", "ab3"]);
        assert_eq!(at(&["!r"], 100), vec!["", "a9", "ab3", "u6"]);
        assert_eq!(at(&["!r", "t"], 6), vec!["", "a5", "ab3"]);
        assert_eq!(at(&["!r", "t", "a"], 8), vec!["a5"]);
        assert_eq!(at(&["!r2"], 100), vec!["other room"]);
    }
}
