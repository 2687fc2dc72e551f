//! `/user_directory/search`: the users a requester may find. As the spec requires at a minimum
//! (and no more, as the privacy default): users who share a room with the requester, and users
//! joined to rooms with a public join rule or world-readable history. Local users only until
//! federation lands.

use std::collections::BTreeSet;

use ruma::{events::StateEventType, OwnedUserId, UserId};
use serde_json::{json, Value};

use crate::{
    error::Result,
    service::{sync::room_mates, Services},
};

/// Most results one search returns, whatever the client asks.
pub const MAX_LIMIT: usize = 100;
/// Most rooms one search looks at for public members.
const MAX_ROOMS_SCANNED: usize = 100_000;

/// Users visible to `who` whose id or display name contains `term` (case-insensitive), sorted
/// by user id; `limited` when more matched than `limit`.
pub fn search(s: &Services, who: &UserId, term: &str, limit: usize) -> Result<(Vec<Value>, bool)> {
    let limit = limit.min(MAX_LIMIT);
    let mut visible: BTreeSet<OwnedUserId> = room_mates(s, who)?.into_iter().collect();
    for room in s.rooms.room_ids(MAX_ROOMS_SCANNED)? {
        let join_rule = s
            .rooms
            .state_content(&room, &StateEventType::RoomJoinRules, "")?
            .and_then(|c| {
                c.get("join_rule")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
        let visibility = s
            .rooms
            .state_content(&room, &StateEventType::RoomHistoryVisibility, "")?
            .and_then(|c| {
                c.get("history_visibility")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
        if join_rule.as_deref() == Some("public") || visibility.as_deref() == Some("world_readable")
        {
            visible.extend(s.rooms.joined_members(&room)?.iter().cloned());
        }
    }
    let term = term.to_lowercase();
    let mut results = Vec::new();
    let mut limited = false;
    // The searcher's groups once, not per candidate.
    let groups = &s.access.groups;
    let mine = groups.active().then(|| groups.groups_of(who));
    for user in visible {
        let name = s.profiles.displayname(&user)?;
        let matches = user.as_str().to_lowercase().contains(&term)
            || name
                .as_deref()
                .is_some_and(|n| n.to_lowercase().contains(&term));
        // Closed user groups: only users one may contact can be found.
        let may_contact = match &mine {
            Some(mine) if user != who => groups.sets_may_contact(mine, &groups.groups_of(&user)),
            _ => true,
        };
        if !matches || !may_contact {
            continue;
        }
        if results.len() == limit {
            limited = true;
            break;
        }
        let mut entry = json!({ "user_id": user });
        if let Some(n) = name {
            entry["display_name"] = json!(n);
        }
        if let Some(a) = s.profiles.avatar_url(&user)? {
            entry["avatar_url"] = json!(a);
        }
        results.push(entry);
    }
    Ok((results, limited))
}
