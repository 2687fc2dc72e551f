//! Backups (REQUIREMENTS A7, C2): a consistent copy of the database and the media store, taken
//! while the server runs, on request (`POST /_hafen/admin/v1/backup`) or on a schedule
//! (`backup_interval_secs`), the newest `backup_keep` kept.
//!
//! Without a backup key a backup is a directory, `<backup_path>/hafen-<ms>/{db,media}`, and
//! restoring is starting a server with `database_path` and `media_path` pointing there. With a
//! key (`backup_encryption_key_file`, else `media_encryption_key_file`) it is one file,
//! `<backup_path>/hafen-<ms>.tar.enc`: a tar of the same two directories streamed through the
//! chunked AEAD of [`crate::service::at_rest::stream`] ([`archive`]); `hafen backup restore`
//! turns it back into a directory a server starts on.

pub mod archive;

use std::{
    path::{Path, PathBuf},
    sync::Weak,
    time::Duration,
};

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::json;

use crate::{
    error::{Error, Result},
    service::{at_rest::SecretKey, Services},
    utils,
};

/// Names of finished backups: `hafen-<ms>` (a directory) or `hafen-<ms>.tar.enc` (an archive).
const PREFIX: &str = "hafen-";
pub const ARCHIVE_SUFFIX: &str = ".tar.enc";
/// Work in progress (a crash leaves it; the next run removes it).
const PARTIAL_SUFFIX: &str = ".partial";
/// How many entries of `backup_path` are looked at (it is the operator's directory).
const MAX_ENTRIES: usize = 10_000;

/// Why a backup was taken.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Request,
    Schedule,
}

/// The outcome of the latest run, for `GET /_hafen/admin/v1/backup`.
#[derive(Debug, Clone, Serialize)]
pub struct LastRun {
    pub trigger: Trigger,
    pub started_ts: u64,
    pub finished_ts: u64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Older backups deleted by `backup_keep` after this one.
    pub deleted: Vec<String>,
}

/// A backup below `backup_path`.
#[derive(Debug, Clone, Serialize)]
pub struct BackupInfo {
    pub name: String,
    pub path: String,
    pub created_ts: u64,
    pub size_bytes: u64,
    pub encrypted: bool,
}

pub struct Backups {
    /// Encrypts archives (derived from the configured key); `None`: plain directories.
    key: Option<SecretKey>,
    /// One backup at a time (a scheduled one and a requested one must not interleave).
    running: tokio::sync::Mutex<()>,
    last: Mutex<Option<LastRun>>,
}

/// The archive key derived from the operator's key (also used by `hafen backup restore`).
pub fn archive_key(key: &SecretKey) -> SecretKey {
    key.derive("hafen backup archives v1")
}

impl Backups {
    pub fn new(key: Option<SecretKey>) -> Backups {
        Backups {
            key: key.as_ref().map(archive_key),
            running: tokio::sync::Mutex::new(()),
            last: Mutex::new(None),
        }
    }

    pub fn encrypted(&self) -> bool {
        self.key.is_some()
    }

    pub fn last_run(&self) -> Option<LastRun> {
        self.last.lock().clone()
    }
}

fn io(e: std::io::Error) -> Error {
    Error::internal(format!("backup: {e}"))
}

/// Take a backup now; returns its path (directory or archive). The outcome is kept for
/// `GET /_hafen/admin/v1/backup`, written to the audit log, and a failure is logged.
pub async fn run(services: &Services, trigger: Trigger) -> Result<PathBuf> {
    let root = services
        .config
        .backup_path
        .clone()
        .ok_or_else(|| Error::forbidden("No backup_path is configured"))?;
    let backups = &services.backups;
    let _one_at_a_time = backups.running.lock().await;
    let started_ts = utils::now_ms();
    let storage = services.storage.clone();
    let media_src = services.config.media_dir();
    let key = backups.key.clone();
    let keep = services.config.backup_keep;
    let root_clone = root.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<(PathBuf, Vec<String>)> {
        std::fs::create_dir_all(&root_clone).map_err(io)?;
        remove_partial(&root_clone);
        let name = format!("{PREFIX}{started_ts}");
        let path = match &key {
            Some(key) => archive::write(&storage, &media_src, &root_clone, &name, key)?,
            None => write_directory(&storage, &media_src, &root_clone.join(&name))?,
        };
        let deleted = match keep {
            Some(keep) => prune(&root_clone, keep as usize)?,
            None => Vec::new(),
        };
        Ok((path, deleted))
    })
    .await
    .map_err(Error::internal)
    .and_then(|r| r);
    let finished_ts = utils::now_ms();
    let (outcome, last) = match result {
        Ok((path, deleted)) => {
            tracing::info!(path = %path.display(), ?trigger, deleted = deleted.len(), "backup taken");
            let last = LastRun {
                trigger,
                started_ts,
                finished_ts,
                ok: true,
                path: Some(path.display().to_string()),
                error: None,
                deleted,
            };
            (Ok(path), last)
        }
        Err(e) => {
            tracing::error!(error = %e, ?trigger, "backup failed");
            let last = LastRun {
                trigger,
                started_ts,
                finished_ts,
                ok: false,
                path: None,
                error: Some(e.to_string()),
                deleted: Vec::new(),
            };
            (Err(e), last)
        }
    };
    let mut entry = services.audit.entry("backup", None, None);
    entry.detail = json!({
        "trigger": last.trigger,
        "ok": last.ok,
        "path": last.path,
        "error": last.error,
        "deleted": last.deleted,
    });
    services.audit.note(entry);
    *backups.last.lock() = Some(last);
    outcome
}

/// `hafen backup restore ARCHIVE TARGET`: an encrypted archive into a directory (`TARGET/db`,
/// `TARGET/media`) with the config's backup key.
pub fn restore(
    config: &crate::config::Config,
    archive: &Path,
    target: &Path,
) -> std::result::Result<(), String> {
    if archive.is_dir() {
        return Err(format!(
            "{0} is a plain backup directory: start a server with database_path = {0}/db and \
             media_path = {0}/media (or copy it)",
            archive.display()
        ));
    }
    let keys = crate::service::at_rest::AtRestKeys::load(config)?;
    let key = keys.backup.ok_or(
        "no backup key: set backup_encryption_key_file (or media_encryption_key_file) to the key \
         the backup was written with",
    )?;
    archive::restore(archive, target, &archive_key(&key))
}

/// The scheduled backups (`backup_interval_secs`): one every interval, the first one interval
/// after the start. Ends once the services are gone.
pub async fn run_schedule(services: Weak<Services>) {
    let interval = match services
        .upgrade()
        .and_then(|s| s.config.backup_interval_secs)
    {
        Some(secs) => Duration::from_secs(secs),
        None => return,
    };
    loop {
        tokio::time::sleep(interval).await;
        let Some(s) = services.upgrade() else {
            return;
        };
        // The outcome is recorded and logged by `run`.
        let _ = run(&s, Trigger::Schedule).await;
    }
}

/// A plain backup: media first, then the checkpoint, so every file a row of the checkpoint
/// names is in the backup (files are never changed in place, only added and deleted).
fn write_directory(
    storage: &crate::storage::Storage,
    media_src: &Path,
    dest: &Path,
) -> Result<PathBuf> {
    let partial = with_suffix(dest, PARTIAL_SUFFIX);
    std::fs::create_dir_all(&partial).map_err(io)?;
    copy_tree(media_src, &partial.join("media"), 0)?;
    storage.checkpoint(&partial.join("db"))?;
    std::fs::rename(&partial, dest).map_err(io)?;
    sync_dir(dest.parent());
    Ok(dest.to_owned())
}

pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

pub(crate) fn sync_dir(dir: Option<&Path>) {
    if let Some(dir) = dir {
        if let Ok(f) = std::fs::File::open(dir) {
            let _ = f.sync_all();
        }
    }
}

/// Remove what an interrupted backup left (only our own `hafen-*.partial` names).
fn remove_partial(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten().take(MAX_ENTRIES) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(PREFIX) && name.ends_with(PARTIAL_SUFFIX) {
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

/// The time in a finished backup's name, and whether it is an archive.
fn parse_name(name: &str) -> Option<(u64, bool)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (digits, encrypted) = match rest.strip_suffix(ARCHIVE_SUFFIX) {
        Some(d) => (d, true),
        None => (rest, false),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, encrypted))
}

/// The finished backups below `root`, newest first.
pub fn list(root: &Path) -> Result<Vec<BackupInfo>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        // Not a directory: no backups (the failed runs say why).
        Err(_) if !root.is_dir() => return Ok(out),
        Err(e) => return Err(io(e)),
    };
    for entry in entries.flatten().take(MAX_ENTRIES) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((created_ts, encrypted)) = parse_name(&name) else {
            continue;
        };
        let path = entry.path();
        out.push(BackupInfo {
            size_bytes: tree_size(&path, 0),
            path: path.display().to_string(),
            name,
            created_ts,
            encrypted,
        });
    }
    out.sort_by(|a, b| b.created_ts.cmp(&a.created_ts).then(b.name.cmp(&a.name)));
    Ok(out)
}

/// Delete all but the newest `keep` backups; their names.
fn prune(root: &Path, keep: usize) -> Result<Vec<String>> {
    let mut deleted = Vec::new();
    for old in list(root)?.into_iter().skip(keep) {
        let path = PathBuf::from(&old.path);
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => deleted.push(old.name),
            Err(e) => {
                tracing::error!(backup = %old.path, error = %e, "cannot delete an old backup")
            }
        }
    }
    sync_dir(Some(root));
    Ok(deleted)
}

fn tree_size(path: &Path, depth: usize) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    if depth > 8 {
        return 0;
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| tree_size(&e.path(), depth + 1))
                .sum()
        })
        .unwrap_or(0)
}

/// Copy a directory tree (hard links where the file system allows, copies otherwise),
/// skipping the store's temp files.
fn copy_tree(src: &Path, dest: &Path, depth: usize) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(io)?;
    if depth > 8 || !src.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(src).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        if depth == 0 && name == "tmp" {
            continue;
        }
        let target = dest.join(&name);
        let kind = entry.file_type().map_err(io)?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &target, depth + 1)?;
        } else if kind.is_file() && std::fs::hard_link(entry.path(), &target).is_err() {
            match std::fs::copy(entry.path(), &target) {
                Ok(_) => {}
                // Deleted (retention, erasure) since the directory was read: not in the backup.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_finished_backups_have_names() {
        assert_eq!(parse_name("hafen-123"), Some((123, false)));
        assert_eq!(parse_name("hafen-123.tar.enc"), Some((123, true)));
        assert_eq!(parse_name("hafen-123.partial"), None);
        assert_eq!(parse_name("hafen-.tar.enc"), None);
        assert_eq!(parse_name("pre-migration-v0-123"), None);
    }
}
