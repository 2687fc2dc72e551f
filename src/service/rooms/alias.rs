//! Room aliases (`#name:server` -> room id): the one place that reads and writes the alias tables.
//!
//! Tables: `Aliases` alias -> room id; `RoomAliases` room 0xff alias -> user who created it.

use http::StatusCode;
use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomAliasId, RoomId, UserId};
use serde_json::Value;

use super::{NewEvent, Rooms};
use crate::{
    error::{ErrCode, Error, Result},
    storage::{keys, Table},
};

impl Rooms {
    /// The room an alias points to, if this server knows it.
    pub fn resolve_alias(&self, alias: &RoomAliasId) -> Result<Option<OwnedRoomId>> {
        match self.storage.get(Table::Aliases, alias.as_bytes())? {
            Some(v) => Ok(RoomId::parse(String::from_utf8_lossy(&v).as_ref()).ok()),
            None => Ok(None),
        }
    }

    /// Who created the alias (the user allowed to delete it besides room moderators).
    pub fn alias_creator(&self, alias: &RoomAliasId) -> Result<Option<OwnedUserId>> {
        let Some(room) = self.resolve_alias(alias)? else {
            return Ok(None);
        };
        let key = keys::join(&[room.as_str(), alias.as_str()]);
        Ok(self
            .storage
            .get(Table::RoomAliases, &key)?
            .and_then(|v| UserId::parse(String::from_utf8_lossy(&v).as_ref()).ok()))
    }

    /// The local aliases that point at the room.
    pub fn local_aliases(&self, room_id: &RoomId) -> Result<Vec<OwnedRoomAliasId>> {
        let mut out = Vec::new();
        for entry in self
            .storage
            .scan_prefix(Table::RoomAliases, &keys::prefix(&[room_id.as_str()]))?
        {
            let (k, _) = entry?;
            if let Some(a) = keys::last_part(&k).and_then(|a| RoomAliasId::parse(a).ok()) {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// Create `alias` for `room_id`. The alias must be on this server and not taken
    /// (409 `M_UNKNOWN`, as the spec says); the room must exist.
    pub async fn create_alias(
        &self,
        alias: &RoomAliasId,
        room_id: &RoomId,
        creator: &UserId,
    ) -> Result<()> {
        if alias.server_name() != self.globals.server_name {
            return Err(Error::invalid_param("Room alias must be on this server"));
        }
        if !self.exists(room_id)? {
            return Err(Error::not_found("Room not found"));
        }
        self.ensure_alias_not_exclusive(alias, creator)?;
        if !self.claim_alias(alias, room_id, creator).await? {
            return Err(Error::with_status(
                ErrCode::Unknown,
                StatusCode::CONFLICT,
                "Room alias already exists",
            ));
        }
        Ok(())
    }

    /// Map `alias` to `room_id` if it is free; `false` (and nothing written) if it is taken.
    /// The caller checked the alias is local and the room exists.
    pub(crate) async fn claim_alias(
        &self,
        alias: &RoomAliasId,
        room_id: &RoomId,
        creator: &UserId,
    ) -> Result<bool> {
        // Aliases of any room compete for the same name: one alias writer at a time.
        let _guard = self.lock(&self.alias_lock_id()?).await;
        if self.storage.contains(Table::Aliases, alias.as_bytes())? {
            return Ok(false);
        }
        let mut b = self.storage.batch();
        b.put(Table::Aliases, alias.as_bytes(), room_id.as_bytes())?;
        b.put(
            Table::RoomAliases,
            &keys::join(&[room_id.as_str(), alias.as_str()]),
            creator.as_bytes(),
        )?;
        b.commit()?;
        Ok(true)
    }

    /// 400 `M_EXCLUSIVE` when an appservice reserved `alias` and `creator` is not its user.
    pub(crate) fn ensure_alias_not_exclusive(
        &self,
        alias: &RoomAliasId,
        creator: &UserId,
    ) -> Result<()> {
        match &self.appservices {
            Some(a) => a.ensure_alias_not_exclusive(alias.as_str(), creator),
            None => Ok(()),
        }
    }

    /// A pseudo room id whose lock serializes alias writes.
    fn alias_lock_id(&self) -> Result<OwnedRoomId> {
        RoomId::parse(format!("!alias-writes:{}", self.globals.server_name))
            .map_err(Error::internal)
    }

    /// Remove the mapping only (no permission check, no state update).
    fn remove_alias_mapping(&self, alias: &RoomAliasId, room_id: &RoomId) -> Result<()> {
        let mut b = self.storage.batch();
        b.delete(Table::Aliases, alias.as_bytes())?;
        b.delete(
            Table::RoomAliases,
            &keys::join(&[room_id.as_str(), alias.as_str()]),
        )?;
        b.commit()
    }

    /// Delete `alias` on behalf of `user`: the alias' creator, a server admin, or a user who may
    /// send `m.room.canonical_alias`. If the room's canonical alias event names the alias it is
    /// updated too (best effort: the spec says the deletion succeeds even if that is not allowed).
    pub async fn delete_alias(
        &self,
        alias: &RoomAliasId,
        user: &UserId,
        admin: bool,
    ) -> Result<()> {
        if alias.server_name() != self.globals.server_name {
            return Err(Error::invalid_param("Room alias must be on this server"));
        }
        let room_id = {
            let _guard = self.lock(&self.alias_lock_id()?).await;
            let room_id = self
                .resolve_alias(alias)?
                .ok_or_else(|| Error::not_found("Room alias not found"))?;
            let is_creator = self.alias_creator(alias)?.is_some_and(|c| c == user);
            if !is_creator
                && !admin
                && !self.power_allows_state(&room_id, user, "m.room.canonical_alias")?
            {
                return Err(Error::forbidden("You may not delete this alias"));
            }
            self.remove_alias_mapping(alias, &room_id)?;
            room_id
        };
        if let Err(e) = self.drop_from_canonical_alias(&room_id, user, alias).await {
            tracing::info!(room = %room_id, error = %e, "alias deleted but canonical alias event not updated");
        }
        Ok(())
    }

    /// Erasure: delete every local alias `user` created, and take it out of its room's
    /// canonical alias event where the user may still send one (best effort, as in
    /// `delete_alias`). The alias table is scanned whole, at most `max_rows` rows. Returns the
    /// deleted aliases.
    pub async fn remove_aliases_created_by(
        &self,
        user: &UserId,
        max_rows: usize,
    ) -> Result<Vec<OwnedRoomAliasId>> {
        let mut removed = Vec::new();
        {
            let _guard = self.lock(&self.alias_lock_id()?).await;
            for entry in self
                .storage
                .scan_prefix(Table::RoomAliases, b"")?
                .take(max_rows)
            {
                let (k, v) = entry?;
                if &*v != user.as_bytes() {
                    continue;
                }
                let parts = keys::split(&k);
                let (Some(room), Some(alias)) = (
                    parts.first().and_then(|r| RoomId::parse(*r).ok()),
                    parts.get(1).and_then(|a| RoomAliasId::parse(*a).ok()),
                ) else {
                    continue;
                };
                self.remove_alias_mapping(&alias, &room)?;
                removed.push((room, alias));
            }
        }
        let mut out = Vec::with_capacity(removed.len());
        for (room, alias) in removed {
            if let Err(e) = self.drop_from_canonical_alias(&room, user, &alias).await {
                tracing::info!(%room, error = %e, "erased user's alias deleted but canonical alias event not updated");
            }
            out.push(alias);
        }
        Ok(out)
    }

    /// Remove `alias` from the room's `m.room.canonical_alias` (alias and alt_aliases).
    async fn drop_from_canonical_alias(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        alias: &RoomAliasId,
    ) -> Result<()> {
        let _guard = self.lock(room_id).await;
        let Some(mut content) = self
            .state_get(room_id, "m.room.canonical_alias", "")?
            .map(|p| p.content_value())
        else {
            return Ok(());
        };
        let Some(obj) = content.as_object_mut() else {
            return Ok(());
        };
        let mut changed = false;
        if obj.get("alias").and_then(Value::as_str) == Some(alias.as_str()) {
            obj.remove("alias");
            changed = true;
        }
        if let Some(Value::Array(alts)) = obj.get_mut("alt_aliases") {
            let before = alts.len();
            alts.retain(|a| a.as_str() != Some(alias.as_str()));
            changed |= alts.len() != before;
        }
        if !changed {
            return Ok(());
        }
        self.append_locked(
            room_id,
            sender,
            NewEvent::state("m.room.canonical_alias", "", content),
            None,
        )
        .await?;
        Ok(())
    }

    /// Point every local alias of `from` at `to` (room upgrade). Returns the moved aliases.
    pub(crate) async fn move_aliases(
        &self,
        from: &RoomId,
        to: &RoomId,
    ) -> Result<Vec<OwnedRoomAliasId>> {
        let _guard = self.lock(&self.alias_lock_id()?).await;
        let mut moved = Vec::new();
        let mut b = self.storage.batch();
        for entry in self
            .storage
            .scan_prefix(Table::RoomAliases, &keys::prefix(&[from.as_str()]))?
            .take(10_000)
        {
            let (k, creator) = entry?;
            let Some(alias) = keys::last_part(&k).and_then(|a| RoomAliasId::parse(a).ok()) else {
                continue;
            };
            b.put(Table::Aliases, alias.as_bytes(), to.as_bytes())?;
            b.delete(Table::RoomAliases, &k)?;
            b.put(
                Table::RoomAliases,
                &keys::join(&[to.as_str(), alias.as_str()]),
                &creator,
            )?;
            moved.push(alias);
        }
        b.commit()?;
        Ok(moved)
    }
}
