//! Room summaries and the space hierarchy (`/room_summary`, `/hierarchy`): what a user may learn
//! about a room without being in it, and the tree of a space's `m.space.child` rooms.

use std::collections::HashSet;

use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::{json, Value};

use super::Rooms;
use crate::error::{Error, Result};

/// Rooms one page of the hierarchy returns when the client names no limit, and at most.
pub const DEFAULT_HIERARCHY_LIMIT: usize = 50;
pub const MAX_HIERARCHY_LIMIT: usize = 100;
/// How deep the hierarchy goes by default and at most.
pub const DEFAULT_MAX_DEPTH: usize = 5;
pub const MAX_DEPTH: usize = 10;
/// Most rooms one walk of a space tree visits, whatever the tree looks like.
const MAX_ROOMS_WALKED: usize = 1000;
/// Longest valid `order` in `m.space.child` (the spec's bound).
const MAX_ORDER_LEN: usize = 50;

pub struct HierarchyQuery {
    pub suggested_only: bool,
    pub max_depth: usize,
    pub limit: usize,
    pub from: Option<String>,
}

/// One `m.space.child` of a space, in the spec's sort order.
struct Child {
    room_id: OwnedRoomId,
    order: Option<String>,
    ts: u64,
    suggested: bool,
    stripped: Value,
}

impl Rooms {
    /// The summary of a local room: its directory entry plus version, encryption and the rooms
    /// a restricted join rule allows.
    pub fn room_summary(&self, room_id: &RoomId) -> Result<Value> {
        let mut summary = self.directory_entry(room_id)?;
        summary["room_version"] = json!(self.version(room_id)?);
        if let Some(enc) = self.state_get(room_id, "m.room.encryption", "")? {
            if let Some(alg) = enc.content_value().get("algorithm") {
                summary["encryption"] = alg.clone();
            }
        }
        let allowed = self.allowed_room_ids(room_id)?;
        if !allowed.is_empty() {
            summary["allowed_room_ids"] = json!(allowed);
        }
        Ok(summary)
    }

    fn allowed_room_ids(&self, room_id: &RoomId) -> Result<Vec<OwnedRoomId>> {
        let Some(rules) = self.state_get(room_id, "m.room.join_rules", "")? else {
            return Ok(Vec::new());
        };
        let content = rules.content_value();
        Ok(content
            .get("allow")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|a| a.get("type").and_then(Value::as_str) == Some("m.room_membership"))
            .filter_map(|a| a.get("room_id").and_then(Value::as_str))
            .filter_map(|r| OwnedRoomId::try_from(r).ok())
            .take(MAX_ROOMS_WALKED)
            .collect())
    }

    /// May `user` (None: unauthenticated) see the room's summary? Members and invitees may; so
    /// may anyone when the room is public, knockable or world readable, and members of a room
    /// that a restricted join rule allows.
    pub fn may_preview(&self, room_id: &RoomId, user: Option<&UserId>) -> Result<bool> {
        if !self.exists(room_id)? {
            return Ok(false);
        }
        if let Some(u) = user {
            match self.membership(room_id, u)?.as_deref() {
                Some("join" | "invite") => return Ok(true),
                Some("ban") => return Ok(false),
                _ => {}
            }
        }
        if self.history_visibility(room_id)? == "world_readable" {
            return Ok(true);
        }
        let join_rule = self
            .state_get(room_id, "m.room.join_rules", "")?
            .and_then(|p| {
                p.content_value()
                    .get("join_rule")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "invite".into());
        match join_rule.as_str() {
            "public" | "knock" | "knock_restricted" => Ok(true),
            "restricted" => match user {
                Some(u) => {
                    for allowed in self.allowed_room_ids(room_id)? {
                        if self.is_joined(&allowed, u)? {
                            return Ok(true);
                        }
                    }
                    Ok(false)
                }
                None => Ok(false),
            },
            _ => Ok(false),
        }
    }

    /// The valid `m.space.child` events of a space, sorted by `order`, then time, then room id.
    fn space_children(&self, room_id: &RoomId) -> Result<Vec<Child>> {
        let mut out = Vec::new();
        for pdu in self.current_state_of_type(room_id, "m.space.child")? {
            let Some(child_id) = pdu
                .state_key
                .as_deref()
                .and_then(|k| OwnedRoomId::try_from(k).ok())
            else {
                continue;
            };
            let content = pdu.content_value();
            // A child without `via` servers has been removed.
            if content
                .get("via")
                .and_then(Value::as_array)
                .is_none_or(|v| v.is_empty())
            {
                continue;
            }
            let order = content
                .get("order")
                .and_then(Value::as_str)
                .filter(|o| {
                    o.len() <= MAX_ORDER_LEN
                        && o.chars().all(|c| ('\u{20}'..='\u{7e}').contains(&c))
                })
                .map(str::to_owned);
            let mut stripped = pdu.to_stripped_value();
            stripped["origin_server_ts"] = json!(pdu.origin_server_ts);
            out.push(Child {
                room_id: child_id,
                order,
                ts: u64::from(pdu.origin_server_ts.get()),
                suggested: content.get("suggested").and_then(Value::as_bool) == Some(true),
                stripped,
            });
            if out.len() >= MAX_ROOMS_WALKED {
                break;
            }
        }
        out.sort_by(|a, b| {
            match (&a.order, &b.order) {
                (Some(x), Some(y)) => x.cmp(y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            }
            .then(a.ts.cmp(&b.ts))
            .then(a.room_id.cmp(&b.room_id))
        });
        Ok(out)
    }

    /// One page of the space tree under `root`, depth first, with the next page's token.
    pub fn hierarchy(
        &self,
        root: &RoomId,
        user: &UserId,
        q: &HierarchyQuery,
    ) -> Result<(Vec<Value>, Option<String>)> {
        let offset = match &q.from {
            Some(token) => parse_hierarchy_token(token, q)?,
            None => 0,
        };
        if !self.may_preview(root, Some(user))? {
            return Err(Error::forbidden("You may not view this room"));
        }
        let mut rooms = Vec::new();
        let mut seen: HashSet<OwnedRoomId> = HashSet::new();
        // Depth-first: a stack of (room, depth), children pushed in reverse order.
        let mut stack = vec![(root.to_owned(), 0usize)];
        while rooms.len() < offset + q.limit && seen.len() < MAX_ROOMS_WALKED {
            let Some((room_id, depth)) = stack.pop() else {
                break;
            };
            if !seen.insert(room_id.clone()) {
                continue;
            }
            if room_id != root && !self.may_preview(&room_id, Some(user))? {
                continue;
            }
            let mut entry = self.room_summary(&room_id)?;
            let is_space = entry.get("room_type").and_then(Value::as_str) == Some("m.space");
            let children = if is_space {
                self.space_children(&room_id)?
            } else {
                Vec::new()
            };
            entry["children_state"] =
                Value::Array(children.iter().map(|c| c.stripped.clone()).collect());
            rooms.push(entry);
            if depth < q.max_depth {
                for c in children.into_iter().rev() {
                    if (!q.suggested_only || c.suggested) && !seen.contains(&c.room_id) {
                        stack.push((c.room_id, depth + 1));
                    }
                }
            }
        }
        // Rooms left on the stack may all turn out invisible: the last page can then be empty.
        let more = !stack.is_empty() && seen.len() < MAX_ROOMS_WALKED;
        let page: Vec<Value> = rooms.into_iter().skip(offset).take(q.limit).collect();
        let next = more.then(|| hierarchy_token(offset + page.len(), q));
        Ok((page, next))
    }
}

/// Tokens carry the offset and the parameters that may not change while paginating.
fn hierarchy_token(offset: usize, q: &HierarchyQuery) -> String {
    format!("h{offset}_{}_{}", q.max_depth, u8::from(q.suggested_only))
}

fn parse_hierarchy_token(token: &str, q: &HierarchyQuery) -> Result<usize> {
    let bad = || Error::invalid_param("Unknown pagination token");
    let mut parts = token.strip_prefix('h').ok_or_else(bad)?.split('_');
    // No page starts past the rooms one walk visits: a larger offset is no token of ours (and
    // `offset + limit` must not overflow).
    let offset: usize = parts
        .next()
        .and_then(|p| p.parse().ok())
        .filter(|o| *o <= MAX_ROOMS_WALKED)
        .ok_or_else(bad)?;
    let depth: usize = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let suggested = parts.next().ok_or_else(bad)? == "1";
    if depth != q.max_depth || suggested != q.suggested_only {
        return Err(Error::invalid_param(
            "suggested_only and max_depth cannot change while paginating",
        ));
    }
    Ok(offset)
}

impl Rooms {
    /// `GET /_matrix/federation/v1/hierarchy/{roomId}` for another server: the room (if anyone
    /// may preview it), its children anyone may preview, and the ids of the others.
    /// The server ACL applies: a root that denies `origin` is 403, children that deny it are
    /// listed as inaccessible.
    pub fn federation_hierarchy(
        &self,
        root: &RoomId,
        origin: &ruma::ServerName,
        suggested_only: bool,
    ) -> Result<Value> {
        if !self.may_preview(root, None)? {
            return Err(Error::not_found("Room not found or not previewable"));
        }
        self.ensure_server_acl(root, origin)?;
        let mut room = self.room_summary(root)?;
        let is_space = room.get("room_type").and_then(Value::as_str) == Some("m.space");
        let children = if is_space {
            self.space_children(root)?
        } else {
            Vec::new()
        };
        room["children_state"] =
            Value::Array(children.iter().map(|c| c.stripped.clone()).collect());
        let mut accessible = Vec::new();
        let mut inaccessible = Vec::new();
        for c in children {
            if suggested_only && !c.suggested {
                continue;
            }
            if self.may_preview(&c.room_id, None)? && self.server_acl_allows(&c.room_id, origin)? {
                let mut summary = self.room_summary(&c.room_id)?;
                let grandchildren =
                    if summary.get("room_type").and_then(Value::as_str) == Some("m.space") {
                        self.space_children(&c.room_id)?
                    } else {
                        Vec::new()
                    };
                summary["children_state"] =
                    Value::Array(grandchildren.iter().map(|g| g.stripped.clone()).collect());
                accessible.push(summary);
            } else {
                inaccessible.push(Value::String(c.room_id.to_string()));
            }
        }
        Ok(json!({
            "room": room,
            "children": accessible,
            "inaccessible_children": inaccessible,
        }))
    }
}

/// Property tests: any `from` token is refused or read without panic, never as an offset past
/// what one walk visits, and our tokens read back as written.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, text};

    fn query((suggested_only, max_depth, limit): (bool, usize, usize)) -> HierarchyQuery {
        HierarchyQuery {
            suggested_only,
            max_depth,
            limit,
            from: None,
        }
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn fuzz_hierarchy_tokens(
            token in prop_oneof![
                text(),
                "h[0-9]{0,25}_[0-9]{0,3}_[0-9]?",
                any::<u64>().prop_map(|n| format!("h{n}_3_0")),
            ],
            q in (any::<bool>(), 0usize..20, 1usize..100),
            offset in 0usize..=MAX_ROOMS_WALKED,
        ) {
            let q = query(q);
            if let Ok(o) = parse_hierarchy_token(&token, &q) {
                prop_assert!(o <= MAX_ROOMS_WALKED);
                prop_assert!(o.checked_add(q.limit).is_some());
            }
            prop_assert_eq!(parse_hierarchy_token(&hierarchy_token(offset, &q), &q).ok(), Some(offset));
        }
    }

    #[test]
    fn fuzz_huge_offsets_are_refused() {
        let q = HierarchyQuery {
            suggested_only: false,
            max_depth: 3,
            limit: 50,
            from: None,
        };
        // A forged offset made `offset + limit` overflow (a panic in debug builds).
        assert_eq!(
            parse_hierarchy_token(&format!("h{}_3_0", usize::MAX), &q)
                .err()
                .map(|e| e.errcode()),
            Some("M_INVALID_PARAM")
        );
    }
}
