//! Media files on disk, content-addressed, and the one place that reads and writes them: every
//! user of media bytes (downloads, thumbnails, federation media, URL preview images, the export
//! archive, retention and erasure) goes through [`FileStore`].
//!
//! Plain files are named by the SHA-256 of their bytes,
//! `<media_path>/<first two hex digits>/<next two>/<sha256>`, so equal uploads share one file.
//! With `media_encryption_key_file` set, new files are written encrypted
//! ([`at_rest::stream`]: chunked ChaCha20-Poly1305) and named `<hmac>.enc`, where `hmac` is the
//! HMAC-SHA256 of the content hash under a key derived for names: the name is still stable (equal
//! uploads share a file) but tells nothing about the content to someone without the key. Files
//! written before the key was set keep their plain name and stay readable, so a store may be
//! mixed until `hafen media encrypt` converts it ([`FileStore::encrypt_existing`]).
//!
//! Writes are crash-safe: bytes go to `<media_path>/tmp/<random>`, are fsynced, renamed into place
//! and the directory is fsynced. Only then does the caller write the metadata row, so a row never
//! names a file that a crash could lose; a crash before the row leaves at worst an unreferenced
//! file (or a temp file, removed at the next start).

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    pin::Pin,
};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::{
    error::{ErrCode, Error, Result},
    service::at_rest::{
        stream::{self as aead, Opener, Sealer, CHUNK, HEADER_LEN, SEALED_CHUNK},
        SecretKey,
    },
    utils,
};

/// The bytes of a stored file, as they are read from disk.
pub type FileStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// The file name suffix of encrypted files.
const ENCRYPTED_SUFFIX: &str = ".enc";

/// The keys of an encrypting store, both derived from the operator's media key.
struct Crypt {
    /// Encrypts the files.
    file_key: SecretKey,
    /// Names them (HMAC of the content hash).
    name_key: SecretKey,
}

/// Where the files are, and the key new ones are encrypted with.
pub struct FileStore {
    root: PathBuf,
    crypt: Option<Crypt>,
}

/// A file that is durably in the store.
#[derive(Debug, Clone)]
pub struct StoredFile {
    pub sha256: String,
    pub size: u64,
}

/// What `hafen media encrypt` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EncryptReport {
    /// Plain files now stored encrypted (the plain copy deleted).
    pub converted: u64,
    /// Plain files whose bytes no longer match their name (left alone, and reported).
    pub mismatched: u64,
}

/// Content hashes are 64 hex digits; anything else names no file (and must not reach a path).
fn valid_hash(sha256: &str) -> bool {
    sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit())
}

fn fanned_out(root: &Path, name: &str) -> PathBuf {
    root.join(&name[0..2]).join(&name[2..4]).join(name)
}

fn damaged(sha256: &str, e: impl std::fmt::Display) -> Error {
    Error::internal(format!("media file {sha256}: {e}"))
}

impl FileStore {
    /// Open (create) the store and remove temp files that a crash left behind. With `key`, new
    /// files are written encrypted.
    pub fn open(root: PathBuf, key: Option<&SecretKey>) -> Result<FileStore> {
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp)
            .map_err(|e| Error::internal(format!("cannot create {}: {e}", tmp.display())))?;
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let crypt = key.map(|k| Crypt {
            file_key: k.derive("hafen media files v1"),
            name_key: k.derive("hafen media file names v1"),
        });
        Ok(FileStore { root, crypt })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether new files are written encrypted.
    pub fn encrypts(&self) -> bool {
        self.crypt.is_some()
    }

    /// Where the plain file with this hash is (or was).
    fn plain_path(&self, sha256: &str) -> PathBuf {
        fanned_out(&self.root, sha256)
    }

    /// Where the encrypted file with this hash is (or would be), when the store has a key.
    fn encrypted_path(&self, sha256: &str) -> Option<PathBuf> {
        let crypt = self.crypt.as_ref()?;
        let name = hex(&crypt.name_key.mac(sha256.as_bytes()));
        let mut path = fanned_out(&self.root, &name);
        path.set_extension(&ENCRYPTED_SUFFIX[1..]);
        Some(path)
    }

    /// Store the bytes of `body`, at most `limit` of them (more: 413 `M_TOO_LARGE`, and nothing
    /// is kept). Encrypted when the store has a key. Durable on return.
    pub async fn write_stream<S, E>(&self, mut body: S, limit: u64) -> Result<StoredFile>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let tmp_path = self.root.join("tmp").join(utils::random_string(24));
        let mut file = tokio::fs::File::create(&tmp_path)
            .await
            .map_err(|e| Error::internal(format!("media temp file: {e}")))?;
        let write_err = |e: std::io::Error| Error::internal(format!("media write: {e}"));
        let result = async {
            let mut sealer = self.crypt.as_ref().map(|c| Sealer::new(&c.file_key));
            if let Some(s) = &sealer {
                file.write_all(s.header()).await.map_err(write_err)?;
            }
            // Plaintext not sealed yet: a full chunk waits until more arrives (it may be the last).
            let mut pending: Vec<u8> = Vec::new();
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
                match &mut sealer {
                    None => file.write_all(&chunk).await.map_err(write_err)?,
                    Some(sealer) => {
                        pending.extend_from_slice(&chunk);
                        while pending.len() > CHUNK {
                            let sealed =
                                sealer.seal(&pending[..CHUNK], false).map_err(write_err)?;
                            file.write_all(&sealed).await.map_err(write_err)?;
                            pending.drain(..CHUNK);
                        }
                    }
                }
            }
            if let Some(sealer) = &mut sealer {
                let sealed = sealer.seal(&pending, true).map_err(write_err)?;
                file.write_all(&sealed).await.map_err(write_err)?;
            }
            file.flush().await.map_err(write_err)?;
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
                let target = self
                    .encrypted_path(&stored.sha256)
                    .unwrap_or_else(|| self.plain_path(&stored.sha256));
                place(&tmp_path, &target).await?;
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

    /// The file holding this hash, and whether it is the encrypted one. The encrypted name
    /// wins: after `hafen media encrypt` was interrupted both may exist for a moment.
    async fn locate(&self, sha256: &str) -> Result<(PathBuf, bool)> {
        if !valid_hash(sha256) {
            return Err(Error::internal(format!("invalid media hash {sha256:?}")));
        }
        if let Some(path) = self.encrypted_path(sha256) {
            if tokio::fs::try_exists(&path).await.unwrap_or(false) {
                return Ok((path, true));
            }
        }
        Ok((self.plain_path(sha256), false))
    }

    /// Stream a stored file's bytes (decrypted as they are read, one chunk in memory at a time).
    /// The header and first chunk are checked before this returns, so a damaged small file is
    /// an error here (500 `M_UNKNOWN`, logged) and a damaged chunk further on ends the stream
    /// with an error instead of handing out wrong bytes.
    pub async fn open_stream(&self, sha256: &str) -> Result<FileStream> {
        self.open_range(sha256, 0, u64::MAX).await
    }

    /// [`FileStore::open_stream`] of `len` bytes from byte `start` of the content (HTTP range
    /// requests). An encrypted file is read from the chunk that holds `start` on: seeking costs
    /// no decryption of what comes before.
    pub async fn open_range(&self, sha256: &str, start: u64, len: u64) -> Result<FileStream> {
        let (path, encrypted) = self.locate(sha256).await?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| Error::internal(format!("media file {sha256} missing: {e}")))?;
        let seek_err = |e: std::io::Error| Error::internal(format!("media file {sha256}: {e}"));
        let Some(crypt) = self.crypt.as_ref().filter(|_| encrypted) else {
            if start > 0 {
                file.seek(std::io::SeekFrom::Start(start))
                    .await
                    .map_err(seek_err)?;
            }
            return Ok(Box::pin(tokio_util::io::ReaderStream::new(file.take(len))));
        };
        let mut reader = tokio::io::BufReader::with_capacity(SEALED_CHUNK, file);
        let mut header = [0u8; HEADER_LEN];
        reader
            .read_exact(&mut header)
            .await
            .map_err(|e| damaged(sha256, format!("no header: {e}")))?;
        let mut opener = Opener::new(&crypt.file_key, &header).map_err(|e| damaged(sha256, e))?;
        let index = start / CHUNK as u64;
        if index > 0 {
            let index32 = u32::try_from(index)
                .map_err(|_| Error::internal("range start beyond any encrypted file"))?;
            let at = HEADER_LEN as u64 + index * SEALED_CHUNK as u64;
            reader
                .seek(std::io::SeekFrom::Start(at))
                .await
                .map_err(seek_err)?;
            opener.seek_chunk(index32);
        }
        let mut chunks = Decrypting {
            reader,
            opener,
            sealed: vec![0u8; SEALED_CHUNK],
            skip: (start % CHUNK as u64) as usize,
            remaining: len,
        };
        let first = chunks
            .next_chunk()
            .await
            .map_err(|e| damaged(sha256, e))?
            .unwrap_or_default();
        let hash = sha256.to_owned();
        let rest = futures_util::stream::try_unfold(chunks, |mut c| async move {
            Ok(c.next_chunk().await?.map(|b| (b, c)))
        })
        .map(move |r: std::io::Result<Bytes>| {
            if let Err(e) = &r {
                tracing::error!(media_file = %hash, error = %e, "media file damaged");
            }
            r
        });
        Ok(Box::pin(
            futures_util::stream::once(async move { Ok(first) }).chain(rest),
        ))
    }

    /// Read a whole stored file (thumbnails, federation media; their size is bounded).
    pub async fn read(&self, sha256: &str) -> Result<Vec<u8>> {
        let mut stream = self.open_stream(sha256).await?;
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.map_err(|e| damaged(sha256, e))?);
        }
        Ok(out)
    }

    /// Delete the file with this hash (either form; both when a conversion left two). A file
    /// that is not there is no error.
    pub async fn remove(&self, sha256: &str) -> Result<()> {
        if !valid_hash(sha256) {
            return Ok(());
        }
        let paths = [Some(self.plain_path(sha256)), self.encrypted_path(sha256)];
        for path in paths.into_iter().flatten() {
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::internal(format!(
                        "cannot delete media file {sha256}: {e}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// `hafen media encrypt` (server stopped): rewrite every plain file encrypted. Each file is
    /// encrypted into a temp file, fsynced and renamed into place before the plain one is
    /// deleted, so an interruption at any point loses nothing and running it again finishes
    /// the job. Blocking.
    pub fn encrypt_existing(&self) -> Result<EncryptReport> {
        let crypt = self.crypt.as_ref().ok_or_else(|| {
            Error::internal("media_encryption_key_file is not set: there is no key to encrypt with")
        })?;
        let io = |e: std::io::Error| Error::internal(format!("media encrypt: {e}"));
        let mut report = EncryptReport::default();
        // Two levels of fan-out directories (`ab/cd/`), then the files.
        for first in read_dir_sorted(&self.root).map_err(io)? {
            if first.file_name().is_some_and(|n| n == "tmp") || !first.is_dir() {
                continue;
            }
            for second in read_dir_sorted(&first).map_err(io)? {
                if !second.is_dir() {
                    continue;
                }
                for path in read_dir_sorted(&second).map_err(io)? {
                    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                        continue;
                    };
                    if !valid_hash(name) || !path.is_file() {
                        continue;
                    }
                    let name = name.to_owned();
                    if self.encrypt_one(crypt, &path, &name).map_err(io)? {
                        report.converted += 1;
                    } else {
                        tracing::warn!(file = %path.display(), "media file does not match its hash; left unencrypted");
                        report.mismatched += 1;
                    }
                }
            }
        }
        Ok(report)
    }

    /// Encrypt one plain file; false when its bytes do not hash to its name.
    fn encrypt_one(&self, crypt: &Crypt, plain: &Path, sha256: &str) -> std::io::Result<bool> {
        let Some(target) = self.encrypted_path(sha256) else {
            return Ok(false);
        };
        let tmp_path = self.root.join("tmp").join(utils::random_string(24));
        let result = (|| -> std::io::Result<bool> {
            let mut input = std::fs::File::open(plain)?;
            let out = std::fs::File::create(&tmp_path)?;
            let mut writer = aead::EncryptWriter::new(&crypt.file_key, out)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = input.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                writer.write_all(&buf[..n])?;
            }
            let out = writer.finish()?;
            out.sync_all()?;
            Ok(hex(&hasher.finalize()) == sha256)
        })();
        match result {
            Ok(true) => {
                place_blocking(&tmp_path, &target)?;
                std::fs::remove_file(plain)?;
                if let Some(dir) = plain.parent() {
                    std::fs::File::open(dir)?.sync_all()?;
                }
                Ok(true)
            }
            other => {
                let _ = std::fs::remove_file(&tmp_path);
                other
            }
        }
    }
}

/// Reads an encrypted file chunk by chunk.
struct Decrypting {
    reader: tokio::io::BufReader<tokio::fs::File>,
    opener: Opener,
    sealed: Vec<u8>,
    /// Bytes of the next chunk before the requested range.
    skip: usize,
    /// Bytes of the range still to deliver.
    remaining: u64,
}

impl Decrypting {
    /// The next piece of the range; `None` after the last chunk or the end of the range.
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        if self.opener.finished() || self.remaining == 0 {
            return Ok(None);
        }
        let mut got = 0;
        while got < self.sealed.len() {
            let n = self.reader.read(&mut self.sealed[got..]).await?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "encrypted data damaged: truncated (the last chunk is missing)",
            ));
        }
        let last = got < SEALED_CHUNK || self.reader.fill_buf().await?.is_empty();
        let plain = Bytes::from(self.opener.open(&self.sealed[..got], last)?);
        let from = std::mem::take(&mut self.skip).min(plain.len());
        let take = (plain.len() - from).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        self.remaining -= take as u64;
        Ok(Some(plain.slice(from..from + take)))
    }
}

fn read_dir_sorted(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    out.sort();
    Ok(out)
}

/// Move a durable temp file to its name and make the rename durable.
async fn place(tmp_path: &Path, target: &Path) -> Result<()> {
    let tmp_path = tmp_path.to_owned();
    let target = target.to_owned();
    tokio::task::spawn_blocking(move || place_blocking(&tmp_path, &target))
        .await
        .map_err(|e| Error::internal(format!("media store task: {e}")))?
        .map_err(|e| Error::internal(format!("media store: {e}")))
}

fn place_blocking(tmp_path: &Path, target: &Path) -> std::io::Result<()> {
    let dir = target
        .parent()
        .ok_or_else(|| std::io::Error::other("media path has no parent"))?;
    std::fs::create_dir_all(dir)?;
    if target.exists() {
        // The same bytes are already stored (and were made durable when they were).
        std::fs::remove_file(tmp_path)?;
        return Ok(());
    }
    std::fs::rename(tmp_path, target)?;
    std::fs::File::open(dir)?.sync_all()
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

/// Whether a file's first bytes are an encrypted file's header (for tools and tests).
pub fn looks_encrypted(first_bytes: &[u8]) -> bool {
    aead::is_encrypted(first_bytes)
}
