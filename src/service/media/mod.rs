//! The media repository: uploads (direct, and create-then-upload), downloads that wait for a
//! pending upload, thumbnails made once and kept, and URL previews.
//!
//! Files live in the content-addressed [`store::FileStore`]; what the database keeps (table
//! `media` and its indexes, see `storage::tables`) is written only after the file is durable.
//! Media of other servers arrives with federation: until then it is "not found".

pub mod addr;
pub mod erase;
pub mod preview;
mod retention;
pub mod store;
pub mod thumbnail;

use std::{collections::HashSet, time::Duration};

use bytes::Bytes;
use futures_util::Stream;
use parking_lot::Mutex;
use ruma::{OwnedServerName, ServerName, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;

use crate::{
    config::Config,
    error::{ErrCode, Error, Result},
    storage::{Storage, Table},
    utils,
};

use self::{
    store::{FileStore, StoredFile},
    thumbnail::{Method, Size},
};

/// Longest a download waits for a pending upload, whatever `timeout_ms` asks.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// The wait when the client names none (the spec's default).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(20);
/// Longest media id a client may name (ours are 24 characters).
const MAX_MEDIA_ID_LEN: usize = 255;
/// Longest file name kept with an upload.
const MAX_FILENAME_BYTES: usize = 255;

/// What the database knows of one media id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MediaRecord {
    pub uploader: String,
    pub created_ts: u64,
    /// For a `/create`d id not uploaded yet: when it expires (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unused_expires_at: Option<u64>,
    /// The content, once uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileInfo>,
}

/// An uploaded file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileInfo {
    pub sha256: String,
    pub size: u64,
    pub content_type: Option<String>,
    pub filename: Option<String>,
    pub uploaded_ts: u64,
}

/// A thumbnail made from a file (keyed by the file's hash and the size).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThumbnailRecord {
    pub sha256: String,
    pub size: u64,
    pub content_type: String,
    pub width: u32,
    pub height: u32,
}

/// How the client described an upload.
#[derive(Debug, Clone, Default)]
pub struct UploadMeta {
    pub content_type: Option<String>,
    pub filename: Option<String>,
    /// The declared `Content-Length`, checked against the limit before reading anything.
    pub content_length: Option<u64>,
}

pub struct Media {
    storage: Storage,
    files: FileStore,
    server_name: OwnedServerName,
    max_upload_size: u64,
    max_pending: usize,
    pending_expiry_ms: u64,
    preview_enabled: bool,
    fetcher: preview::Fetcher,
    previews: preview::Cache,
    /// Woken whenever an upload completes (downloads waiting for a pending id recheck).
    uploaded: Notify,
    /// Thumbnails being made at once: each decode may take up to the decoder's memory limit,
    /// so parallel requests for big images must queue instead of multiplying it.
    thumbnailing: tokio::sync::Semaphore,
    /// Media ids whose upload is in progress (a second upload to one is refused).
    uploading: Mutex<HashSet<String>>,
}

fn media_key(server: &ServerName, media_id: &str) -> Vec<u8> {
    let mut k = server.as_bytes().to_vec();
    k.push(0xff);
    k.extend_from_slice(media_id.as_bytes());
    k
}

/// `media_file_refs` key: which media id uses a stored file.
pub(crate) fn file_ref_key(sha256: &str, server: &ServerName, media_id: &str) -> Vec<u8> {
    let mut k = sha256.as_bytes().to_vec();
    k.push(0xff);
    k.extend_from_slice(&media_key(server, media_id));
    k
}

fn user_media_key(user: &str, server: &ServerName, media_id: &str) -> Vec<u8> {
    let mut k = user.as_bytes().to_vec();
    k.push(0xff);
    k.extend_from_slice(&media_key(server, media_id));
    k
}

fn thumbnail_key(sha256: &str, size: Size) -> Vec<u8> {
    format!(
        "{sha256}\u{ff}{}\u{ff}{}\u{ff}{}",
        size.width,
        size.height,
        size.method.as_str()
    )
    .into_bytes()
}

/// Media ids are `[A-Za-z0-9_-]+` (the spec's grammar); anything else cannot exist.
fn valid_media_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_MEDIA_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn not_found() -> Error {
    Error::not_found("Media not found")
}

/// Removes a media id from the in-progress set when its upload ends, however it ends.
struct UploadingGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    id: String,
}

impl Drop for UploadingGuard<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.id);
    }
}

impl Media {
    /// With `key` (`media_encryption_key_file`), new files and thumbnails are stored encrypted.
    pub fn new(
        storage: Storage,
        config: &Config,
        key: Option<&crate::service::at_rest::SecretKey>,
    ) -> Result<Media> {
        Ok(Media {
            storage,
            files: FileStore::open(config.media_dir(), key)?,
            server_name: config.server_name.clone(),
            max_upload_size: config.max_upload_size,
            max_pending: config.max_pending_media_uploads,
            pending_expiry_ms: config.pending_media_expiry_secs.saturating_mul(1000),
            preview_enabled: config.url_preview_enabled,
            fetcher: preview::Fetcher::new(&config.url_preview_ip_range_allowlist),
            previews: preview::Cache::default(),
            uploaded: Notify::new(),
            thumbnailing: tokio::sync::Semaphore::new(2),
            uploading: Mutex::new(HashSet::new()),
        })
    }

    pub fn max_upload_size(&self) -> u64 {
        self.max_upload_size
    }

    pub fn files(&self) -> &FileStore {
        &self.files
    }

    fn mxc(&self, media_id: &str) -> String {
        format!("mxc://{}/{media_id}", self.server_name)
    }

    fn record(&self, server: &ServerName, media_id: &str) -> Result<Option<MediaRecord>> {
        self.storage
            .get_json(Table::Media, &media_key(server, media_id))
    }

    /// `POST /upload`: store the body and return its `mxc://` URI.
    pub async fn upload<S, E>(&self, user: &UserId, body: S, meta: UploadMeta) -> Result<String>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let meta = self.check_meta(meta)?;
        let stored = self.files.write_stream(body, self.max_upload_size).await?;
        let media_id = utils::random_string(24);
        let record = MediaRecord {
            uploader: user.to_string(),
            created_ts: utils::now_ms(),
            unused_expires_at: None,
            file: None,
        };
        self.commit_file(user, &media_id, record, stored, meta)
            .await?;
        Ok(self.mxc(&media_id))
    }

    fn check_meta(&self, mut meta: UploadMeta) -> Result<UploadMeta> {
        if let Some(len) = meta.content_length {
            if len > self.max_upload_size {
                return Err(store::too_large(self.max_upload_size));
            }
        }
        if let Some(name) = &meta.filename {
            if name.len() > MAX_FILENAME_BYTES || name.chars().any(char::is_control) {
                return Err(Error::invalid_param(format!(
                    "filename must be at most {MAX_FILENAME_BYTES} bytes without control characters"
                )));
            }
        }
        meta.filename = meta.filename.filter(|n| !n.is_empty());
        meta.content_type = meta.content_type.filter(|t| !t.trim().is_empty());
        Ok(meta)
    }

    /// Write the metadata of a durable file (and its indexes) in one batch, durable on return,
    /// and wake downloads that wait for it.
    async fn commit_file(
        &self,
        user: &UserId,
        media_id: &str,
        mut record: MediaRecord,
        stored: StoredFile,
        meta: UploadMeta,
    ) -> Result<()> {
        let server = &self.server_name;
        record.unused_expires_at = None;
        record.file = Some(FileInfo {
            sha256: stored.sha256.clone(),
            size: stored.size,
            content_type: meta.content_type,
            filename: meta.filename,
            uploaded_ts: utils::now_ms(),
        });
        let user_key = user_media_key(user.as_str(), server, media_id);
        let refs_key = file_ref_key(&stored.sha256, server, media_id);
        let mut batch = self.storage.batch();
        batch.put(
            Table::Media,
            &media_key(server, media_id),
            &serde_json::to_vec(&record)?,
        )?;
        batch.put(Table::MediaByUser, &user_key, b"")?;
        batch.put(Table::MediaFileRefs, &refs_key, b"")?;
        batch.delete(Table::MediaPending, &user_key)?;
        let ticket = batch.commit_deferred()?;
        self.storage.durable(ticket).await?;
        self.uploaded.notify_waiters();
        Ok(())
    }

    /// `POST /create`: a media id to upload to later, and when it expires unused.
    pub async fn create(&self, user: &UserId) -> Result<(String, u64)> {
        let now = utils::now_ms();
        let server = self.server_name.clone();
        // Count the user's pending ids; expired ones are removed on the way.
        let mut prefix = user.as_bytes().to_vec();
        prefix.push(0xff);
        let mut pending = 0;
        let mut expired = Vec::new();
        for entry in self.storage.scan_prefix(Table::MediaPending, &prefix)? {
            let (k, v) = entry?;
            let expires = v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            // An expired id whose upload is under way (it started in time) stays until done.
            let in_upload = crate::storage::keys::last_part(&k)
                .is_some_and(|id| self.uploading.lock().contains(id));
            if expires <= now && !in_upload {
                expired.push(k);
            } else if expires > now {
                pending += 1;
            }
        }
        if pending >= self.max_pending {
            return Err(Error::RateLimited {
                retry_after_ms: 60_000,
            });
        }
        let media_id = utils::random_string(24);
        let expires_at = now + self.pending_expiry_ms;
        let record = MediaRecord {
            uploader: user.to_string(),
            created_ts: now,
            unused_expires_at: Some(expires_at),
            file: None,
        };
        let mut batch = self.storage.batch();
        for k in expired {
            // key: user 0xff server 0xff media id; the media row is server 0xff media id.
            batch.delete(Table::MediaPending, &k)?;
            batch.delete(Table::Media, &k[prefix.len()..])?;
        }
        batch.put(
            Table::Media,
            &media_key(&server, &media_id),
            &serde_json::to_vec(&record)?,
        )?;
        batch.put(
            Table::MediaPending,
            &user_media_key(user.as_str(), &server, &media_id),
            &expires_at.to_be_bytes(),
        )?;
        let ticket = batch.commit_deferred()?;
        self.storage.durable(ticket).await?;
        Ok((self.mxc(&media_id), expires_at))
    }

    /// `PUT /upload/{serverName}/{mediaId}`: the content of a `/create`d id.
    pub async fn upload_to<S, E>(
        &self,
        user: &UserId,
        server: &str,
        media_id: &str,
        body: S,
        meta: UploadMeta,
    ) -> Result<()>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        if server != self.server_name.as_str() || !valid_media_id(media_id) {
            return Err(Error::not_found("Unknown media id"));
        }
        // `starting`: the expiry counts when the upload starts, not when its last byte arrives.
        let check = |record: Option<MediaRecord>, starting: bool| -> Result<MediaRecord> {
            let record = record.ok_or_else(|| Error::not_found("Unknown media id"))?;
            if record.uploader != user.as_str() {
                return Err(Error::forbidden(
                    "This media id was created by another user",
                ));
            }
            if record.file.is_some() {
                return Err(Error::new(
                    ErrCode::CannotOverwriteMedia,
                    "Media already uploaded",
                ));
            }
            let expired = record
                .unused_expires_at
                .is_some_and(|t| t <= utils::now_ms());
            if starting && expired {
                return Err(Error::not_found("The media id has expired"));
            }
            Ok(record)
        };
        let server = self.server_name.clone();
        check(self.record(&server, media_id)?, true)?;
        let meta = self.check_meta(meta)?;
        if !self.uploading.lock().insert(media_id.to_owned()) {
            return Err(Error::new(
                ErrCode::CannotOverwriteMedia,
                "Media is being uploaded",
            ));
        }
        let _guard = UploadingGuard {
            set: &self.uploading,
            id: media_id.to_owned(),
        };
        let stored = self.files.write_stream(body, self.max_upload_size).await?;
        // Checked again (the record is re-read for the write); an upload that started in time
        // completes even if the id expired while its body arrived.
        let record = check(self.record(&server, media_id)?, false)?;
        self.commit_file(user, media_id, record, stored, meta).await
    }

    /// The file of a media id, waiting up to `timeout` (at most [`MAX_WAIT`]) for a pending
    /// upload: 504 `M_NOT_YET_UPLOADED` if it does not arrive, 404 for unknown, expired and
    /// remote media.
    pub async fn file(&self, server: &str, media_id: &str, timeout: Duration) -> Result<FileInfo> {
        if !valid_media_id(media_id) {
            return Err(not_found());
        }
        if server != self.server_name.as_str() {
            // Another server's media: only what was fetched already (see
            // `federation::media::remote_file`).
            let server = ServerName::parse(server).map_err(|_| not_found())?;
            return self.remote_cached(&server, media_id)?.ok_or_else(not_found);
        }
        let server = self.server_name.clone();
        let deadline = tokio::time::Instant::now() + timeout.min(MAX_WAIT);
        loop {
            let notified = self.uploaded.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let record = self.record(&server, media_id)?.ok_or_else(not_found)?;
            if let Some(file) = record.file {
                return Ok(file);
            }
            if record
                .unused_expires_at
                .is_some_and(|t| t <= utils::now_ms())
            {
                return Err(not_found());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::new(
                    ErrCode::NotYetUploaded,
                    "Content has not yet been uploaded",
                ));
            }
        }
    }

    /// Another server's media as fetched before, if it was.
    pub fn remote_cached(&self, server: &ServerName, media_id: &str) -> Result<Option<FileInfo>> {
        if !valid_media_id(media_id) {
            return Err(not_found());
        }
        Ok(self.record(server, media_id)?.and_then(|r| r.file))
    }

    /// Keep another server's media (fetched over federation) under its own `mxc://` name. The
    /// file is durable before its row is written, as for uploads; the file-reference index lets
    /// erasure and retention find it.
    pub async fn store_remote(
        &self,
        server: &ServerName,
        media_id: &str,
        content: crate::service::federation::BodyStream,
        limit: u64,
        content_type: Option<String>,
        filename: Option<String>,
        now: u64,
    ) -> Result<FileInfo> {
        if !valid_media_id(media_id) || server == self.server_name {
            return Err(not_found());
        }
        let stored = self.files.write_stream(content, limit).await?;
        let file = FileInfo {
            sha256: stored.sha256.clone(),
            size: stored.size,
            content_type: content_type.filter(|t| !t.trim().is_empty() && t.len() <= 255),
            filename,
            uploaded_ts: now,
        };
        let record = MediaRecord {
            uploader: String::new(),
            created_ts: now,
            unused_expires_at: None,
            file: Some(file.clone()),
        };
        let refs_key = file_ref_key(&stored.sha256, server, media_id);
        let mut batch = self.storage.batch();
        batch.put(
            Table::Media,
            &media_key(server, media_id),
            &serde_json::to_vec(&record)?,
        )?;
        batch.put(Table::MediaFileRefs, &refs_key, b"")?;
        let ticket = batch.commit_deferred()?;
        self.storage.durable(ticket).await?;
        Ok(file)
    }

    /// The thumbnail of a media id for the requested size: made once, then served from disk.
    pub async fn thumbnail(
        &self,
        server: &str,
        media_id: &str,
        width: u32,
        height: u32,
        method: Method,
        timeout: Duration,
    ) -> Result<ThumbnailRecord> {
        if width == 0 || height == 0 {
            return Err(Error::invalid_param("width and height must be positive"));
        }
        let file = self.file(server, media_id, timeout).await?;
        let size = thumbnail::choose(width, height, method);
        let key = thumbnail_key(&file.sha256, size);
        if let Some(t) = self.storage.get_json(Table::MediaThumbnails, &key)? {
            return Ok(t);
        }
        if file.size > thumbnail::MAX_SOURCE_BYTES {
            return Err(Error::new(
                ErrCode::TooLarge,
                "Content is too large to thumbnail",
            ));
        }
        let _permit = self.thumbnailing.acquire().await.map_err(Error::internal)?;
        // Another request may have made it while this one waited.
        if let Some(t) = self.storage.get_json(Table::MediaThumbnails, &key)? {
            return Ok(t);
        }
        let original = self.files.read(&file.sha256).await?;
        let made = tokio::task::spawn_blocking(move || thumbnail::make(&original, size))
            .await
            .map_err(|e| Error::internal(format!("thumbnail task: {e}")))??;
        let stored = self.files.write_bytes(made.bytes.into()).await?;
        let record = ThumbnailRecord {
            sha256: stored.sha256,
            size: stored.size,
            content_type: made.content_type.to_owned(),
            width: made.width,
            height: made.height,
        };
        let mut batch = self.storage.batch();
        batch.put(Table::MediaThumbnails, &key, &serde_json::to_vec(&record)?)?;
        let ticket = batch.commit_deferred()?;
        self.storage.durable(ticket).await?;
        Ok(record)
    }

    /// `GET /preview_url`: the OpenGraph data of a page; its `og:image` is stored as media of
    /// the asking user and named by its `mxc://` URI.
    pub async fn preview(&self, user: &UserId, raw_url: &str) -> Result<Value> {
        if !self.preview_enabled {
            return Err(Error::new(
                ErrCode::Unrecognized,
                "URL previews are disabled on this server",
            ));
        }
        let url = preview::parse_url(raw_url)?;
        let now = utils::now_ms();
        if let Some(cached) = self.previews.get(url.as_str(), now) {
            return Ok(cached);
        }
        let page = self
            .fetcher
            .fetch(url.clone(), preview::MAX_PAGE_BYTES)
            .await?;
        let mut og = serde_json::Map::new();
        if page.content_type.starts_with("image/") {
            // A body that filled the page limit may be cut short: never store half an image.
            if page.body.len() < preview::MAX_PAGE_BYTES {
                self.add_image(user, &mut og, page).await?;
            }
        } else if page.content_type.starts_with("text/html")
            || page.content_type.starts_with("application/xhtml")
        {
            // Parsing is CPU work on untrusted input: keep it off the async workers.
            let body = page.body.clone();
            og = tokio::task::spawn_blocking(move || {
                preview::opengraph(&String::from_utf8_lossy(&body))
            })
            .await
            .map_err(Error::internal)?;
            let image_url = og
                .remove("og:image")
                .and_then(|v| v.as_str().map(str::to_owned))
                .and_then(|s| page.url.join(&s).ok())
                .and_then(|u| preview::parse_url(u.as_str()).ok());
            if let Some(image_url) = image_url {
                // A missing or refused image leaves the preview without one.
                let limit = (preview::MAX_IMAGE_BYTES as u64).min(self.max_upload_size) as usize;
                if let Ok(image) = self.fetcher.fetch(image_url, limit + 1).await {
                    if image.body.len() <= limit && image.content_type.starts_with("image/") {
                        self.add_image(user, &mut og, image).await?;
                    }
                }
            }
        }
        let value = Value::Object(og);
        self.previews.put(url.to_string(), value.clone(), now);
        Ok(value)
    }

    /// Store a fetched image as the user's media and describe it in `og`.
    async fn add_image(
        &self,
        user: &UserId,
        og: &mut serde_json::Map<String, Value>,
        image: preview::Fetched,
    ) -> Result<()> {
        let dimensions = image::ImageReader::new(std::io::Cursor::new(&image.body))
            .with_guessed_format()
            .ok()
            .and_then(|r| r.into_dimensions().ok());
        let size = image.body.len() as u64;
        let stream = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(image.body)]);
        let meta = UploadMeta {
            content_type: Some(image.content_type.clone()),
            filename: None,
            content_length: Some(size),
        };
        let mxc = self.upload(user, stream, meta).await?;
        og.insert("og:image".into(), Value::String(mxc));
        og.insert("og:image:type".into(), Value::String(image.content_type));
        og.insert("matrix:image:size".into(), Value::from(size));
        if let Some((w, h)) = dimensions {
            og.insert("og:image:width".into(), Value::from(w));
            og.insert("og:image:height".into(), Value::from(h));
        }
        Ok(())
    }
}

/// `hafen media encrypt` (server stopped): rewrite the plain files of the media store encrypted
/// with `media_encryption_key_file`. The database is opened (and held) only so that a running
/// server makes this fail instead of racing it; it is not changed (file names derive from the
/// content hashes the rows keep).
pub fn encrypt_store(config: &Config) -> std::result::Result<store::EncryptReport, String> {
    let keys = crate::service::at_rest::AtRestKeys::load(config)?;
    let key = keys
        .media
        .ok_or("media_encryption_key_file is not set: there is no key to encrypt with")?;
    let _held = Storage::open(&config.database_path, 8, true).map_err(|e| e.to_string())?;
    let files = FileStore::open(config.media_dir(), Some(&key)).map_err(|e| e.to_string())?;
    files.encrypt_existing().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_ids_follow_the_grammar() {
        assert!(valid_media_id("abcDEF123_-"));
        assert!(!valid_media_id(""));
        assert!(!valid_media_id("../etc"));
        assert!(!valid_media_id("a b"));
        assert!(!valid_media_id(&"a".repeat(256)));
    }
}
