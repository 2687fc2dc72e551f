//! Media files on disk, content-addressed: a file's name is the SHA-256 of its bytes,
//! `<media_path>/<first two hex digits>/<next two>/<sha256>`, so equal uploads share one file.
//!
//! Writes are crash-safe: bytes go to `<media_path>/tmp/<random>`, are fsynced, renamed into place
//! and the directory is fsynced. Only then does the caller write the metadata row, so a row never
//! names a file that a crash could lose; a crash before the row leaves at worst an unreferenced
//! file (or a temp file, removed at the next start).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::{
    error::{ErrCode, Error, Result},
    utils,
};

/// Where the files are.
pub struct FileStore {
    root: PathBuf,
}

/// A file that is durably in the store.
#[derive(Debug, Clone)]
pub struct StoredFile {
    pub sha256: String,
    pub size: u64,
}

impl FileStore {
    /// Open (create) the store and remove temp files that a crash left behind.
    pub fn open(root: PathBuf) -> Result<FileStore> {
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp)
            .map_err(|e| Error::internal(format!("cannot create {}: {e}", tmp.display())))?;
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(FileStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of the file with this hash. `sha256` must be 64 hex digits (we only pass our own).
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.root
            .join(&sha256[0..2])
            .join(&sha256[2..4])
            .join(sha256)
    }

    /// Store the bytes of `body`, at most `limit` of them (more: 413 `M_TOO_LARGE`, and nothing
    /// is kept). Durable on return.
    pub async fn write_stream<S, E>(&self, mut body: S, limit: u64) -> Result<StoredFile>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let tmp_path = self.root.join("tmp").join(utils::random_string(24));
        let mut file = tokio::fs::File::create(&tmp_path)
            .await
            .map_err(|e| Error::internal(format!("media temp file: {e}")))?;
        let result = async {
            let mut hasher = Sha256::new();
            let mut size: u64 = 0;
            while let Some(chunk) = body.next().await {
                let chunk =
                    chunk.map_err(|e| Error::bad_json(format!("cannot read the upload: {e}")))?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(too_large(limit));
                }
                hasher.update(&chunk);
                file.write_all(&chunk)
                    .await
                    .map_err(|e| Error::internal(format!("media write: {e}")))?;
            }
            file.sync_all()
                .await
                .map_err(|e| Error::internal(format!("media fsync: {e}")))?;
            Ok(StoredFile {
                sha256: hex(&hasher.finalize()),
                size,
            })
        }
        .await;
        drop(file);
        match result {
            Ok(stored) => {
                self.place(&tmp_path, &stored.sha256).await?;
                Ok(stored)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp_path).await;
                Err(e)
            }
        }
    }

    /// Store bytes already in memory (thumbnails, preview images).
    pub async fn write_bytes(&self, bytes: Bytes) -> Result<StoredFile> {
        let stream = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(bytes)]);
        self.write_stream(stream, u64::MAX).await
    }

    /// Move a durable temp file to its content address and make the rename durable.
    async fn place(&self, tmp_path: &Path, sha256: &str) -> Result<()> {
        let target = self.path(sha256);
        let dir = target
            .parent()
            .ok_or_else(|| Error::internal("media path has no parent"))?
            .to_owned();
        let tmp_path = tmp_path.to_owned();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            if target.exists() {
                // The same bytes are already stored (and were made durable when they were).
                std::fs::remove_file(&tmp_path)?;
                return Ok(());
            }
            std::fs::rename(&tmp_path, &target)?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| Error::internal(format!("media store task: {e}")))?
        .map_err(|e| Error::internal(format!("media store: {e}")))
    }

    /// Open a stored file for reading.
    pub async fn open_file(&self, sha256: &str) -> Result<tokio::fs::File> {
        tokio::fs::File::open(self.path(sha256))
            .await
            .map_err(|e| Error::internal(format!("media file {sha256} missing: {e}")))
    }

    /// Read a whole stored file (thumbnailing reads the original this way; its size is bounded).
    pub async fn read(&self, sha256: &str) -> Result<Vec<u8>> {
        tokio::fs::read(self.path(sha256))
            .await
            .map_err(|e| Error::internal(format!("media file {sha256} missing: {e}")))
    }
}

pub fn too_large(limit: u64) -> Error {
    Error::new(
        ErrCode::TooLarge,
        format!("The upload is larger than the limit of {limit} bytes"),
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
