//! Media retention (D4): media past `media_retention.local_max_lifetime` (uploads of this
//! server, from the upload) or `remote_max_lifetime` (other servers' media cached here, from
//! the fetch) is deleted: its row and index rows, and its file and thumbnails once no other media
//! refers to the same file (`media_file_refs`). `Media::delete_media` is the step erasure reuses.

use ruma::ServerName;

use super::{media_key, user_media_key, Media, MediaRecord, ThumbnailRecord};
use crate::{
    error::Result,
    storage::{keys, Table},
};

/// Media rows looked at per batch.
const SCAN_CHUNK: usize = 500;

impl Media {
    /// Delete the media past their lifetime as of `now` (ms); `None` lifetimes keep media
    /// forever. Returns how many media were deleted. Bounded batches, each one atomic; a file is
    /// removed only after the rows that named it are gone, so a crash leaves at worst an
    /// unreferenced file (deleted by the next run, see [`Media::delete_file_if_unused`]).
    pub async fn purge_expired(
        &self,
        now: u64,
        local_max_lifetime: Option<u64>,
        remote_max_lifetime: Option<u64>,
    ) -> Result<usize> {
        if local_max_lifetime.is_none() && remote_max_lifetime.is_none() {
            return Ok(0);
        }
        let mut deleted = 0;
        let mut from = Vec::new();
        loop {
            let mut expired = Vec::new();
            let mut last = None;
            for entry in self
                .storage
                .scan_from(Table::Media, b"", &from, false)?
                .take(SCAN_CHUNK)
            {
                let (k, v) = entry?;
                last = Some(k.clone());
                let Ok(record) = serde_json::from_slice::<MediaRecord>(&v) else {
                    continue;
                };
                let parts = keys::split(&k);
                let (Some(server), Some(media_id)) = (parts.first(), parts.get(1)) else {
                    continue;
                };
                let local = *server == self.server_name.as_str();
                let lifetime = if local {
                    local_max_lifetime
                } else {
                    remote_max_lifetime
                };
                let Some(lifetime) = lifetime else { continue };
                let since = record
                    .file
                    .as_ref()
                    .map_or(record.created_ts, |f| f.uploaded_ts);
                if since.saturating_add(lifetime) <= now {
                    expired.push((server.to_string(), media_id.to_string()));
                }
            }
            for (server, media_id) in expired {
                if let Ok(server) = <&ServerName>::try_from(server.as_str()) {
                    if self.delete_media(server, &media_id).await? {
                        deleted += 1;
                    }
                }
            }
            match last {
                Some(k) => {
                    from = k.to_vec();
                    from.push(0);
                }
                None => return Ok(deleted),
            }
        }
    }

    /// Delete one media id: its rows in one batch, then its file and thumbnails if no other
    /// media uses the file. Returns false when there was no such media.
    pub async fn delete_media(&self, server: &ServerName, media_id: &str) -> Result<bool> {
        let key = media_key(server, media_id);
        let Some(record) = self.storage.get_json::<MediaRecord>(Table::Media, &key)? else {
            return Ok(false);
        };
        let mut batch = self.storage.batch();
        batch.delete(Table::Media, &key)?;
        if !record.uploader.is_empty() {
            let user_key = user_media_key(&record.uploader, server, media_id);
            batch.delete(Table::MediaByUser, &user_key)?;
            batch.delete(Table::MediaPending, &user_key)?;
        }
        if let Some(file) = &record.file {
            batch.delete(
                Table::MediaFileRefs,
                &super::file_ref_key(&file.sha256, server, media_id),
            )?;
        }
        let ticket = batch.commit_deferred()?;
        self.storage.durable(ticket).await?;
        if let Some(file) = &record.file {
            self.delete_file_if_unused(&file.sha256).await?;
        }
        Ok(true)
    }

    /// Remove a stored file and its thumbnails when no media refers to it any more.
    pub async fn delete_file_if_unused(&self, sha256: &str) -> Result<()> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(());
        }
        let prefix = keys::prefix(&[sha256]);
        if self
            .storage
            .scan_prefix(Table::MediaFileRefs, &prefix)?
            .next()
            .is_some()
        {
            return Ok(());
        }
        let mut thumbs = Vec::new();
        let mut batch = self.storage.batch();
        for entry in self.storage.scan_prefix(Table::MediaThumbnails, &prefix)? {
            let (k, v) = entry?;
            if let Ok(t) = serde_json::from_slice::<ThumbnailRecord>(&v) {
                thumbs.push(t.sha256);
            }
            batch.delete(Table::MediaThumbnails, &k)?;
        }
        if !batch.is_empty() {
            let ticket = batch.commit_deferred()?;
            self.storage.durable(ticket).await?;
        }
        for thumb in thumbs {
            let in_use = self
                .storage
                .scan_prefix(Table::MediaFileRefs, &keys::prefix(&[thumb.as_str()]))?
                .next()
                .is_some();
            if !in_use {
                self.remove_file(&thumb).await?;
            }
        }
        self.remove_file(sha256).await
    }

    async fn remove_file(&self, sha256: &str) -> Result<()> {
        self.files.remove(sha256).await
    }
}
