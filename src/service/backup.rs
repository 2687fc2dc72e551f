//! Online backups (REQUIREMENTS A7): a consistent copy of the database and the media store,
//! taken while the server runs, into `backup_path/<time>/{db,media}`. Restoring is starting a
//! server with `database_path` and `media_path` pointing there.

use std::path::{Path, PathBuf};

use crate::{
    error::{Error, Result},
    service::Services,
    utils,
};

/// Take a backup now; returns its directory.
pub async fn run(services: &Services) -> Result<PathBuf> {
    let root = services
        .config
        .backup_path
        .clone()
        .ok_or_else(|| Error::forbidden("No backup_path is configured"))?;
    let dest = root.join(format!("hafen-{}", utils::now_ms()));
    let storage = services.storage.clone();
    let media_src = services.config.media_dir();
    let dest_clone = dest.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        std::fs::create_dir_all(&dest_clone).map_err(io)?;
        // Media first: a file a database row names is then always in the backup (files are
        // never changed in place, only added and deleted).
        copy_tree(&media_src, &dest_clone.join("media"), 0)?;
        storage.checkpoint(&dest_clone.join("db"))
    })
    .await
    .map_err(Error::internal)??;
    Ok(dest)
}

fn io(e: std::io::Error) -> Error {
    Error::internal(format!("backup: {e}"))
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
            std::fs::copy(entry.path(), &target).map_err(io)?;
        }
    }
    Ok(())
}
