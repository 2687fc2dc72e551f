//! Profiles: display name and avatar (and custom fields). Storage only; the profile endpoints
//! also mirror changes into every joined room as new member events.

use ruma::UserId;
use serde_json::Value;

use crate::{
    error::Result,
    storage::{keys, Storage, Table},
};

pub struct Profiles {
    storage: Storage,
}

impl Profiles {
    pub fn new(storage: Storage) -> Profiles {
        Profiles { storage }
    }

    /// One profile field ("displayname", "avatar_url", or a custom key).
    pub fn get(&self, user: &UserId, field: &str) -> Result<Option<Value>> {
        self.storage
            .get_json(Table::Profile, &keys::join(&[user.as_str(), field]))
    }

    /// Set (Some) or remove (None) one field.
    pub fn set(&self, user: &UserId, field: &str, value: Option<&Value>) -> Result<()> {
        let key = keys::join(&[user.as_str(), field]);
        let mut b = self.storage.batch();
        match value {
            Some(v) if !v.is_null() => b.put(Table::Profile, &key, &serde_json::to_vec(v)?)?,
            _ => b.delete(Table::Profile, &key)?,
        }
        b.commit()
    }

    /// Every field of the profile.
    pub fn all(&self, user: &UserId) -> Result<serde_json::Map<String, Value>> {
        let mut out = serde_json::Map::new();
        for entry in self
            .storage
            .scan_prefix(Table::Profile, &keys::prefix(&[user.as_str()]))?
        {
            let (k, v) = entry?;
            if let Some(field) = keys::last_part(&k) {
                out.insert(field.to_owned(), serde_json::from_slice(&v)?);
            }
        }
        Ok(out)
    }

    pub fn displayname(&self, user: &UserId) -> Result<Option<String>> {
        Ok(self
            .get(user, "displayname")?
            .and_then(|v| v.as_str().map(str::to_owned)))
    }

    pub fn avatar_url(&self, user: &UserId) -> Result<Option<String>> {
        Ok(self
            .get(user, "avatar_url")?
            .and_then(|v| v.as_str().map(str::to_owned)))
    }
}

/// Longest profile key (spec: 255 bytes) and largest profile (spec: 64 KiB).
pub const MAX_KEY_LEN: usize = 255;
pub const MAX_PROFILE_SIZE: usize = 64 * 1024;

/// Set (Some) or remove (None) a profile field and, for the display name and avatar, tell every
/// joined room with a new member event that keeps the rest of the member content.
pub async fn set_field(
    services: &crate::service::Services,
    user: &UserId,
    field: &str,
    value: Option<&Value>,
) -> Result<()> {
    if field.len() > MAX_KEY_LEN {
        return Err(crate::error::Error::new(
            crate::error::ErrCode::KeyTooLarge,
            "Profile key is longer than 255 bytes",
        ));
    }
    let mut profile = services.profiles.all(user)?;
    match value {
        Some(v) if !v.is_null() => profile.insert(field.to_owned(), v.clone()),
        _ => profile.remove(field),
    };
    if serde_json::to_vec(&profile)?.len() > MAX_PROFILE_SIZE {
        return Err(crate::error::Error::new(
            crate::error::ErrCode::ProfileTooLarge,
            "Profile would be larger than 64 KiB",
        ));
    }
    services.profiles.set(user, field, value)?;
    if field != "displayname" && field != "avatar_url" {
        return Ok(());
    }
    for room_id in services.rooms.joined_rooms(user)? {
        let current = services.rooms.state_content(
            &room_id,
            &ruma::events::StateEventType::RoomMember,
            user.as_str(),
        )?;
        let mut content = match current {
            Some(Value::Object(o)) => o,
            _ => serde_json::Map::new(),
        };
        content.insert("membership".into(), Value::String("join".into()));
        match value {
            Some(v) if !v.is_null() => content.insert(field.to_owned(), v.clone()),
            _ => content.remove(field),
        };
        // A profile change is not worth failing over in one room; the others still get it.
        let event = crate::service::rooms::NewEvent::state(
            "m.room.member",
            user.as_str(),
            Value::Object(content),
        );
        if let Err(e) = services.rooms.append(&room_id, user, event, None).await {
            tracing::warn!(%room_id, error = %e, "could not update member event for profile change");
        }
    }
    Ok(())
}
