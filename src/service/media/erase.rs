//! A user's media for the data subject's rights: listing it for export and deleting it on
//! erasure (rows, and the stored file once no other media id uses it).

use ruma::ServerName;

use super::{media_key, user_media_key, Media, MediaRecord};
use crate::{
    error::Result,
    storage::{keys, Table},
};

/// Most media ids one user's listing or erasure handles (a bound, far above real use).
const MAX_USER_MEDIA: usize = 1_000_000;

/// One media id a user uploaded.
#[derive(Debug, Clone)]
pub struct UserMedia {
    pub server: String,
    pub media_id: String,
    pub record: MediaRecord,
}

impl Media {
    /// Every media id `user` uploaded (or reserved with `/create`), with its record.
    pub fn user_media(&self, user: &str) -> Result<Vec<UserMedia>> {
        let prefix = keys::prefix(&[user]);
        let mut out = Vec::new();
        for entry in self
            .storage
            .scan_prefix(Table::MediaByUser, &prefix)?
            .take(MAX_USER_MEDIA)
        {
            let (k, _) = entry?;
            let rest = &k[prefix.len()..];
            let Some(sep) = rest.iter().position(|b| *b == 0xff) else {
                continue;
            };
            let server = String::from_utf8_lossy(&rest[..sep]).into_owned();
            let media_id = String::from_utf8_lossy(&rest[sep + 1..]).into_owned();
            let Ok(server_name) = <&ServerName>::try_from(server.as_str()) else {
                continue;
            };
            if let Some(record) = self.record(server_name, &media_id)? {
                out.push(UserMedia {
                    server,
                    media_id,
                    record,
                });
            }
        }
        Ok(out)
    }

    /// Delete everything `user` uploaded: the media rows, and each stored file (with its
    /// thumbnails) when no other media id refers to it any more. Returns how many ids went.
    pub async fn delete_user_media(&self, user: &str) -> Result<usize> {
        let media = self.user_media(user)?;
        let mut files = Vec::new();
        for m in &media {
            let Ok(server) = <&ServerName>::try_from(m.server.as_str()) else {
                continue;
            };
            let key = media_key(server, &m.media_id);
            let user_key = user_media_key(user, server, &m.media_id);
            let mut batch = self.storage.batch();
            batch.delete(Table::Media, &key)?;
            batch.delete(Table::MediaByUser, &user_key)?;
            batch.delete(Table::MediaPending, &user_key)?;
            if let Some(file) = &m.record.file {
                batch.delete(
                    Table::MediaFileRefs,
                    &super::file_ref_key(&file.sha256, server, &m.media_id),
                )?;
                files.push(file.sha256.clone());
            }
            batch.commit()?;
        }
        files.sort();
        files.dedup();
        for sha in files {
            self.delete_file_if_unused(&sha).await?;
        }
        // Media ids reserved with `/create` but never uploaded are only in the pending table.
        let prefix = keys::prefix(&[user]);
        let pending: Vec<Box<[u8]>> = self
            .storage
            .scan_prefix(Table::MediaPending, &prefix)?
            .take(MAX_USER_MEDIA)
            .filter_map(|e| e.ok().map(|(k, _)| k))
            .collect();
        if !pending.is_empty() {
            let mut batch = self.storage.batch();
            for k in pending {
                batch.delete(Table::MediaPending, &k)?;
                if let Some(rest) = k.get(prefix.len()..) {
                    batch.delete(Table::Media, rest)?;
                }
            }
            batch.commit()?;
        }
        Ok(media.len())
    }
}
