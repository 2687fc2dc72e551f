//! Schema versions and migrations (REQUIREMENTS A10).
//!
//! The database records the version of its layout in the `global` table (`schema_version`,
//! a big-endian u64). At every start (server and admin commands) [`prepare`] compares it with
//! [`CURRENT`]:
//!
//! - a new database (nothing in `global` yet) is stamped with the current version;
//! - the current version: nothing to do;
//! - an older version: a RocksDB checkpoint of the whole database is taken first (below
//!   `backup_path`, or beside the database when that is unset) and its path logged, then the
//!   migration steps run in order, each recording the version it reached, so a crash during a
//!   migration resumes at the step that was interrupted (steps are written to be repeatable);
//! - a newer version (written by a later release): refused, nothing is touched, so starting an
//!   older binary by mistake cannot damage the data.
//!
//! A database from before versioning has no `schema_version` but rows in `global` (every
//! start writes the stream counter and the signing key there): it is version 0.

use std::path::{Path, PathBuf};

use super::{Storage, Table};
use crate::error::Result;

/// The layout this build reads and writes.
pub const CURRENT: u64 = 3;

const VERSION_KEY: &[u8] = b"schema_version";

/// One step from version `from` to `from + 1`.
pub struct Migration {
    pub from: u64,
    /// What it changes, for the log.
    pub what: &'static str,
    pub run: fn(&Storage) -> Result<()>,
}

/// The steps, in order.
///
/// 0 -> 1: databases from before schema versions. Their layout is the one version 1 describes;
/// the step changes no rows, it records the version (the pre-migration backup is still taken).
///
/// 1 -> 2: the per-key state log `state_by_key` is filled from `state_log`, so the state at a
/// position is read by key instead of replayed from the room's first event.
///
/// 2 -> 3: the `visibility_log` (the history visibility events of backfilled history, by which
/// clients are shown it) is filled from the backfilled history.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        from: 0,
        what: "record the schema version of a database from before versioning",
        run: |_| Ok(()),
    },
    Migration {
        from: 1,
        what: "index the state log by state key (state_by_key)",
        run: index_state_by_key,
    },
    Migration {
        from: 2,
        what: "fill the history visibility log from the state log",
        run: crate::service::rooms::visibility::rebuild_log,
    },
];

/// Rewrites every `state_log` row as its `state_by_key` row (same count); repeatable, since a
/// row is always written with the same key and value.
fn index_state_by_key(storage: &Storage) -> Result<()> {
    const ROWS_PER_BATCH: usize = 10_000;
    let mut batch = storage.batch();
    let mut in_batch = 0;
    for entry in storage.scan_prefix(Table::StateLog, b"")? {
        let (k, v) = entry?;
        let Some((room, count)) = super::keys::text_and_count(&k) else {
            continue;
        };
        let change: serde_json::Value = serde_json::from_slice(&v)?;
        let field = |name: &str| {
            change
                .get(name)
                .and_then(|f| f.as_str())
                .unwrap_or_default()
        };
        let removed = change.get("removed").and_then(|r| r.as_bool()) == Some(true);
        let key = super::keys::with_count(&[room, field("event_type"), field("state_key")], count);
        let value = if removed { "" } else { field("event_id") };
        batch.put(Table::StateByKey, &key, value.as_bytes())?;
        in_batch += 1;
        if in_batch == ROWS_PER_BATCH {
            std::mem::replace(&mut batch, storage.batch()).commit()?;
            in_batch = 0;
        }
    }
    batch.commit()
}

/// What [`prepare`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// A new database, stamped with the current version.
    New,
    /// Already at the current version.
    Current,
    /// Migrated from `from`; the copy taken before is at `backup`.
    Migrated { from: u64, backup: PathBuf },
}

/// The stored schema version (`None`: none recorded).
pub fn stored_version(storage: &Storage) -> Result<Option<u64>> {
    Ok(storage
        .get(Table::Global, VERSION_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_be_bytes))
}

/// Record a schema version (durable on return). Tests use it to make old and new databases.
pub fn set_version(storage: &Storage, version: u64) -> Result<()> {
    storage.put(Table::Global, VERSION_KEY, &version.to_be_bytes())
}

/// Bring the database at `db_path` to [`CURRENT`] with [`MIGRATIONS`]; see the module docs.
pub fn prepare(
    storage: &Storage,
    db_path: &Path,
    backup_root: Option<&Path>,
) -> std::result::Result<Prepared, String> {
    migrate(storage, db_path, backup_root, CURRENT, MIGRATIONS)
}

/// [`prepare`] with the target version and steps given (tests run their own steps).
pub fn migrate(
    storage: &Storage,
    db_path: &Path,
    backup_root: Option<&Path>,
    target: u64,
    steps: &[Migration],
) -> std::result::Result<Prepared, String> {
    let err = |e: crate::error::Error| format!("schema version: {e}");
    let from = match stored_version(storage).map_err(err)? {
        Some(v) if v == target => return Ok(Prepared::Current),
        Some(v) if v > target => {
            return Err(format!(
                "the database at {} has schema version {v}, newer than the version {target} \
                 that this Hafen ({}) knows: it was written by a later release. Start that \
                 release again, or restore the backup taken before the upgrade (see \
                 docs/upgrading.md). The database was not changed.",
                db_path.display(),
                crate::VERSION,
            ))
        }
        Some(v) => v,
        None => {
            let empty = storage
                .scan_prefix(Table::Global, b"")
                .map_err(err)?
                .next()
                .is_none();
            if empty {
                set_version(storage, target).map_err(err)?;
                return Ok(Prepared::New);
            }
            0
        }
    };
    // Every step from `from` to `target` must be there before anything is touched.
    for v in from..target {
        if !steps.iter().any(|s| s.from == v) {
            return Err(format!(
                "no migration from schema version {v} (this build knows {target})"
            ));
        }
    }
    let backup = pre_migration_checkpoint(storage, db_path, backup_root, from, target)?;
    tracing::warn!(
        backup = %backup.display(),
        from,
        to = target,
        "migrating the database; a copy of it as it was is at the backup path"
    );
    for v in from..target {
        if let Some(step) = steps.iter().find(|s| s.from == v) {
            tracing::info!(from = v, to = v + 1, what = step.what, "migration step");
            (step.run)(storage).map_err(|e| {
                format!(
                    "migration from schema version {v} failed: {e}; the database as it was before \
                     the migration is at {}",
                    backup.display()
                )
            })?;
            set_version(storage, v + 1).map_err(err)?;
        }
    }
    Ok(Prepared::Migrated { from, backup })
}

/// A checkpoint of the database before the first step: `<backup_path>/pre-migration-v<from>-
/// to-v<to>-<ms>`, or beside the database (`<database_path>.pre-migration-...`).
fn pre_migration_checkpoint(
    storage: &Storage,
    db_path: &Path,
    backup_root: Option<&Path>,
    from: u64,
    to: u64,
) -> std::result::Result<PathBuf, String> {
    let name = format!("pre-migration-v{from}-to-v{to}-{}", crate::utils::now_ms());
    let dest = match backup_root {
        Some(root) => root.join(name),
        None => {
            let mut s = db_path.as_os_str().to_owned();
            s.push(format!(".{name}"));
            PathBuf::from(s)
        }
    };
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    storage.checkpoint(&dest).map_err(|e| {
        format!(
            "cannot take the backup before migrating ({}): {e}; nothing was migrated",
            dest.display()
        )
    })?;
    Ok(dest)
}
