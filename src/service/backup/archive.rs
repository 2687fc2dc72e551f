//! Encrypted backup archives: `hafen-<ms>.tar.enc`, a tar of `media/` (the media store, as it
//! is on disk: files that are encrypted there stay so) and `db/` (a RocksDB checkpoint), written
//! through [`EncryptWriter`] as it is made, so neither the tar nor any plaintext of it is ever on
//! disk; and its restore into a directory a server starts on.

use std::{
    io::{BufWriter, Read},
    path::{Path, PathBuf},
};

use crate::{
    error::{Error, Result},
    service::at_rest::{
        stream::{DecryptReader, EncryptWriter},
        SecretKey,
    },
    storage::Storage,
};

use super::{sync_dir, with_suffix, ARCHIVE_SUFFIX, PARTIAL_SUFFIX};

fn io(e: std::io::Error) -> Error {
    Error::internal(format!("backup archive: {e}"))
}

/// Write `<root>/<name>.tar.enc`. Media go in first, then the checkpoint (taken after them), so
/// every file a row names is in the archive. Blocking.
pub fn write(
    storage: &Storage,
    media_src: &Path,
    root: &Path,
    name: &str,
    key: &SecretKey,
) -> Result<PathBuf> {
    let target = root.join(format!("{name}{ARCHIVE_SUFFIX}"));
    let partial = with_suffix(&target, PARTIAL_SUFFIX);
    // The checkpoint is plaintext on disk only while it is copied into the archive, in a
    // directory below backup_path, deleted right after (RocksDB hard-links its table files, so
    // it costs little space).
    let checkpoint = root.join(format!("{name}.checkpoint{PARTIAL_SUFFIX}"));
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&partial).map_err(io)?;
        let writer =
            EncryptWriter::new(key, BufWriter::with_capacity(256 * 1024, file)).map_err(io)?;
        let mut tar = tar::Builder::new(writer);
        append_tree(&mut tar, media_src, Path::new("media"), 0)?;
        storage.checkpoint(&checkpoint)?;
        append_tree(&mut tar, &checkpoint, Path::new("db"), 0)?;
        let writer = tar.into_inner().map_err(io)?;
        let buffered = writer.finish().map_err(io)?;
        let file = buffered.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&checkpoint);
    match result {
        Ok(()) => {
            std::fs::rename(&partial, &target).map_err(io)?;
            sync_dir(Some(root));
            Ok(target)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

/// Add the files below `dir` as `name/...`, skipping the media store's temp files and files
/// deleted while the tree is walked.
fn append_tree<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    dir: &Path,
    name: &Path,
    depth: usize,
) -> Result<()> {
    if depth > 8 {
        return Ok(());
    }
    let mut entries: Vec<_> = match std::fs::read_dir(dir) {
        Ok(e) => e.flatten().collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && depth > 0 => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(e)),
    };
    entries.sort_by_key(|e| e.file_name());
    tar.append_dir(name, dir)
        .or_else(|_| {
            // The directory itself may be missing (an empty media store); an entry is still written.
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o700);
            header.set_size(0);
            tar.append_data(&mut header, name, std::io::empty())
        })
        .map_err(io)?;
    for entry in entries {
        let file_name = entry.file_name();
        if depth == 0 && name == Path::new("media") && file_name == "tmp" {
            continue;
        }
        let path = entry.path();
        let inner = name.join(&file_name);
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            append_tree(tar, &path, &inner, depth + 1)?;
        } else if kind.is_file() {
            let mut file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(e)),
            };
            tar.append_file(&inner, &mut file).map_err(io)?;
        }
    }
    Ok(())
}

/// `hafen backup restore`: unpack an encrypted archive into `target` (which must not exist or
/// be empty): `target/db` and `target/media`, for `database_path` and `media_path`. The archive
/// is unpacked into `<target>.partial` first and renamed when all of it decrypted, so a damaged
/// archive or a wrong key leaves no half restore behind.
pub fn restore(archive: &Path, target: &Path, key: &SecretKey) -> std::result::Result<(), String> {
    if let Ok(mut entries) = std::fs::read_dir(target) {
        if entries.next().is_some() {
            return Err(format!("{} is not empty", target.display()));
        }
    }
    let partial = with_suffix(target, PARTIAL_SUFFIX);
    let _ = std::fs::remove_dir_all(&partial);
    let result = (|| -> std::result::Result<(), String> {
        let file = std::fs::File::open(archive)
            .map_err(|e| format!("cannot open {}: {e}", archive.display()))?;
        let reader = DecryptReader::new(key, file).map_err(|e| {
            format!(
                "{} is not an encrypted Hafen backup: {e}",
                archive.display()
            )
        })?;
        std::fs::create_dir_all(&partial)
            .map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
        let mut tar = tar::Archive::new(reader);
        tar.set_preserve_permissions(true);
        tar.unpack(&partial).map_err(|e| {
            format!(
                "cannot restore {} (damaged, or another key): {e}",
                archive.display()
            )
        })?;
        // tar stops at its end marker; the rest must decrypt too (it holds the last chunk, whose
        // check tells that nothing was cut off).
        let mut rest = tar.into_inner();
        std::io::copy(&mut rest, &mut std::io::sink()).map_err(|e| {
            format!(
                "cannot restore {} (damaged or truncated): {e}",
                archive.display()
            )
        })?;
        let mut probe = [0u8; 1];
        if rest.read(&mut probe).map_err(|e| e.to_string())? != 0 {
            return Err("data after the end of the archive".into());
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            let _ = std::fs::remove_dir(target);
            std::fs::rename(&partial, target)
                .map_err(|e| format!("cannot move the restore to {}: {e}", target.display()))?;
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            Err(e)
        }
    }
}
