//! `POST /_matrix/client/v3/search` (room events). The search itself is in
//! `service::rooms::search`; this adds the context, profiles, state and groupings asked for.

use std::{collections::BTreeMap, sync::Arc};

use axum::{extract::State, Json, Router};
use ruma::{
    api::client::search::search_events::v3::{GroupingKey, OrderBy, Request},
    OwnedRoomId,
};
use serde_json::{json, Map, Value};

use crate::{
    api::ruma_wrapper::{ruma_route, Ruma},
    error::{Error, Result},
    service::{
        rooms::{history::token, search::SearchQuery, visibility::At},
        Services,
    },
};

/// The keys the spec allows searching in.
const SEARCH_KEYS: [&str; 3] = ["content.body", "content.name", "content.topic"];
/// Most events of context on each side of a result.
const MAX_CONTEXT: u64 = 20;

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    ruma_route::<Request, _, _>(r, search)
}

fn parse_next_batch(t: &str) -> Result<u64> {
    t.strip_prefix('r')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::invalid_param("Invalid next_batch token"))
}

async fn search(State(s): State<Arc<Services>>, req: Ruma<Request>) -> Result<Json<Value>> {
    let who = req.user()?.clone();
    let before = req
        .body
        .next_batch
        .as_deref()
        .map(parse_next_batch)
        .transpose()?;
    let Some(criteria) = req.body.search_categories.room_events else {
        return Ok(Json(json!({ "search_categories": {} })));
    };
    let keys: Vec<String> = match &criteria.keys {
        Some(k) if !k.is_empty() => k.iter().map(|k| k.as_str().to_owned()).collect(),
        _ => SEARCH_KEYS.iter().map(|k| (*k).to_owned()).collect(),
    };
    if let Some(bad) = keys.iter().find(|k| !SEARCH_KEYS.contains(&k.as_str())) {
        return Err(Error::invalid_param(format!("Cannot search in '{bad}'")));
    }
    let query = SearchQuery {
        term: &criteria.search_term,
        keys,
        filter: &criteria.filter,
        by_rank: matches!(criteria.order_by, Some(OrderBy::Rank) | None),
        before,
    };
    let found = s.rooms.search(&who.user_id, &query)?;

    let ctx = &criteria.event_context;
    let before_limit = u64::from(ctx.before_limit).min(MAX_CONTEXT) as usize;
    let after_limit = u64::from(ctx.after_limit).min(MAX_CONTEXT) as usize;
    let event_json = |p: &crate::service::rooms::Pdu| {
        s.rooms
            .client_event_for(p, &who.user_id, who.device_id.as_str())
    };
    let mut results = Vec::with_capacity(found.hits.len());
    let mut groups: BTreeMap<&str, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut rooms_seen: Vec<OwnedRoomId> = Vec::new();
    for hit in &found.hits {
        let room_id = hit.pdu.room()?.to_owned();
        let mut context = json!({});
        if before_limit > 0 || after_limit > 0 || ctx.include_profile {
            let mut viewer = s.rooms.viewer(&room_id, &who.user_id);
            let mut keep = |count: u64, p: &crate::service::rooms::Pdu| -> Result<bool> {
                viewer.can_see(p, At::Stream(count))
            };
            let (b, _) = s
                .rooms
                .paginate(&room_id, hit.count, true, before_limit, &mut keep)?;
            let (a, _) = s
                .rooms
                .paginate(&room_id, hit.count, false, after_limit, &mut keep)?;
            let start = token(b.last().map_or(hit.count, |(c, _)| *c).saturating_sub(1));
            let end = token(a.last().map_or(hit.count, |(c, _)| *c));
            context = json!({
                "start": start,
                "end": end,
                "events_before": b.iter().map(|(_, p)| event_json(p)).collect::<Result<Vec<_>>>()?,
                "events_after": a.iter().map(|(_, p)| event_json(p)).collect::<Result<Vec<_>>>()?,
            });
            if ctx.include_profile {
                let mut profiles = Map::new();
                for sender in b
                    .iter()
                    .chain(a.iter())
                    .map(|(_, p)| &p.sender)
                    .chain([&hit.pdu.sender])
                {
                    // As the searcher may know it: for a room they left, the profile then.
                    let member = s
                        .rooms
                        .visible_member_event(&room_id, &who.user_id, sender)?
                        .map(|p| p.content_value());
                    let field = |f: &str| member.as_ref().and_then(|m| m.get(f)).cloned();
                    let mut p = Map::new();
                    if let Some(v) = field("displayname").filter(Value::is_string) {
                        p.insert("displayname".into(), v);
                    }
                    if let Some(v) = field("avatar_url").filter(Value::is_string) {
                        p.insert("avatar_url".into(), v);
                    }
                    profiles.insert(sender.to_string(), Value::Object(p));
                }
                context["profile_info"] = Value::Object(profiles);
            }
        }
        for g in &criteria.groupings.group_by {
            let (name, key) = match g.key {
                Some(GroupingKey::RoomId) => ("room_id", room_id.to_string()),
                Some(GroupingKey::Sender) => ("sender", hit.pdu.sender.to_string()),
                _ => continue,
            };
            groups
                .entry(name)
                .or_default()
                .entry(key)
                .or_default()
                .push(hit.pdu.event_id.to_string());
        }
        if !rooms_seen.contains(&room_id) {
            rooms_seen.push(room_id.clone());
        }
        results.push(json!({
            "rank": hit.rank,
            "result": event_json(&hit.pdu)?,
            "context": context,
        }));
    }
    let mut room_events = json!({
        "count": found.total,
        "highlights": found.terms,
        "results": results,
    });
    if let Some(n) = found.next {
        room_events["next_batch"] = json!(format!("r{n}"));
    }
    if criteria.include_state == Some(true) {
        let mut state = Map::new();
        for room in &rooms_seen {
            let events: Vec<Value> = s
                .rooms
                .current_state(room)?
                .iter()
                .map(|p| p.to_client_value(None))
                .collect();
            state.insert(room.to_string(), Value::Array(events));
        }
        room_events["state"] = Value::Object(state);
    }
    if !groups.is_empty() {
        let mut out = Map::new();
        for (name, by_key) in groups {
            let mut m = Map::new();
            for (order, (key, ids)) in by_key.into_iter().enumerate() {
                m.insert(key, json!({ "results": ids, "order": order }));
            }
            out.insert(name.to_owned(), Value::Object(m));
        }
        room_events["groups"] = Value::Object(out);
    }
    Ok(Json(
        json!({ "search_categories": { "room_events": room_events } }),
    ))
}
