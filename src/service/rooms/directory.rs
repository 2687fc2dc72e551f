//! The published room directory: which rooms are listed, their summaries, search and paging.

use ruma::{RoomId, UserId};
use serde_json::{json, Map, Value};

use super::Rooms;
use crate::error::{Error, Result};

/// The most rooms one directory page returns.
pub const MAX_DIRECTORY_PAGE: usize = 500;
/// The longest search term we look at.
const MAX_SEARCH_TERM: usize = 256;

/// A directory query.
#[derive(Default)]
pub struct DirectoryQuery {
    pub limit: Option<usize>,
    pub since: Option<String>,
    pub search_term: Option<String>,
    /// `filter.room_types`: `None` entries mean rooms without a type.
    pub room_types: Option<Vec<Option<String>>>,
    /// Which lists: the server's own (default), one appservice network, or all of them.
    pub networks: Networks,
}

/// The directory lists a query reads (`third_party_instance_id`, `include_all_networks`).
#[derive(Default, Clone, Debug, PartialEq)]
pub enum Networks {
    #[default]
    Main,
    Instance(String),
    All,
}

/// A page of the directory.
pub struct DirectoryPage {
    pub chunk: Vec<Value>,
    pub next_batch: Option<String>,
    pub prev_batch: Option<String>,
    pub total_room_count_estimate: usize,
}

fn parse_since(since: &str) -> Result<usize> {
    since
        .strip_prefix('o')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::invalid_param("Invalid pagination token"))
}

impl Rooms {
    /// Publish or unpublish a room. Allowed to its creators, server admins and users who may
    /// send `m.room.canonical_alias`. (The policy check for publishing is the caller's.)
    pub fn set_directory_visibility(
        &self,
        room_id: &RoomId,
        user: &UserId,
        admin: bool,
        public: bool,
    ) -> Result<()> {
        if !self.exists(room_id)? {
            return Err(Error::not_found("Room not found"));
        }
        let creator = self.creators_of_room(room_id)?.iter().any(|c| c == user);
        if !creator
            && !admin
            && !self.power_allows_state(room_id, user, "m.room.canonical_alias")?
        {
            return Err(Error::forbidden(
                "You may not change this room's directory visibility",
            ));
        }
        self.set_public(room_id, public)
    }

    /// The directory entry ("PublishedRoomsChunk") of a room.
    pub fn directory_entry(&self, room_id: &RoomId) -> Result<Value> {
        let content = |t: &str, field: &str| -> Result<Option<Value>> {
            Ok(self
                .state_get(room_id, t, "")?
                .and_then(|p| p.content_value().get(field).cloned())
                .filter(|v| !v.is_null()))
        };
        let str_of = |t: &str, field: &str| -> Result<Option<String>> {
            Ok(content(t, field)?.and_then(|v| v.as_str().map(str::to_owned)))
        };
        let mut e = Map::new();
        e.insert("room_id".into(), json!(room_id));
        e.insert(
            "num_joined_members".into(),
            json!(self.joined_members(room_id)?.len()),
        );
        e.insert(
            "world_readable".into(),
            json!(self.history_visibility(room_id)? == "world_readable"),
        );
        e.insert(
            "guest_can_join".into(),
            json!(str_of("m.room.guest_access", "guest_access")?.as_deref() == Some("can_join")),
        );
        e.insert(
            "join_rule".into(),
            json!(str_of("m.room.join_rules", "join_rule")?.unwrap_or_else(|| "invite".into())),
        );
        for (key, t, field) in [
            ("name", "m.room.name", "name"),
            ("topic", "m.room.topic", "topic"),
            ("canonical_alias", "m.room.canonical_alias", "alias"),
            ("avatar_url", "m.room.avatar", "url"),
            ("room_type", "m.room.create", "type"),
        ] {
            if let Some(v) = str_of(t, field)? {
                if !v.is_empty() {
                    e.insert(key.into(), json!(v));
                }
            }
        }
        Ok(Value::Object(e))
    }

    /// One page of the directory: rooms ordered by joined members (most first), then room id.
    pub fn directory_page(&self, q: &DirectoryQuery) -> Result<DirectoryPage> {
        let offset = q
            .since
            .as_deref()
            .map(parse_since)
            .transpose()?
            .unwrap_or(0);
        let limit = q
            .limit
            .unwrap_or(MAX_DIRECTORY_PAGE)
            .min(MAX_DIRECTORY_PAGE);
        let term = q
            .search_term
            .as_deref()
            .map(|t| {
                t.chars()
                    .take(MAX_SEARCH_TERM)
                    .collect::<String>()
                    .to_lowercase()
            })
            .filter(|t| !t.trim().is_empty());

        let mut entries = Vec::new();
        for room_id in self.directory_rooms(&q.networks)? {
            if !self.exists(&room_id)? {
                continue;
            }
            let entry = self.directory_entry(&room_id)?;
            if let Some(types) = &q.room_types {
                let room_type = entry
                    .get("room_type")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                if !types.contains(&room_type) {
                    continue;
                }
            }
            if let Some(term) = &term {
                let mut hay: Vec<String> = ["name", "topic", "canonical_alias"]
                    .iter()
                    .filter_map(|k| entry.get(*k).and_then(Value::as_str).map(str::to_lowercase))
                    .collect();
                for alias in self.local_aliases(&room_id)? {
                    hay.push(alias.as_str().to_lowercase());
                }
                if !hay.iter().any(|h| h.contains(term.as_str())) {
                    continue;
                }
            }
            entries.push(entry);
        }
        entries.sort_by(|a, b| {
            let n = |v: &Value| v["num_joined_members"].as_u64().unwrap_or(0);
            n(b).cmp(&n(a))
                .then_with(|| a["room_id"].as_str().cmp(&b["room_id"].as_str()))
        });
        let total = entries.len();
        let chunk: Vec<Value> = entries.into_iter().skip(offset).take(limit).collect();
        let next_batch =
            (offset.saturating_add(limit) < total).then(|| format!("o{}", offset + limit));
        let prev_batch = (offset > 0).then(|| format!("o{}", offset.saturating_sub(limit)));
        Ok(DirectoryPage {
            chunk,
            next_batch,
            prev_batch,
            total_room_count_estimate: total,
        })
    }
}
