//! Push rules (`/pushrules/...`), pushers (`/pushers`, `/pushers/set`) and `/notifications`.
//! The logic is in `service::push`.

use std::sync::Arc;

use axum::{
    extract::{RawQuery, State},
    routing::put,
    Json, Router,
};
use ruma::{
    api::client::push::{
        delete_pushrule, get_notifications, get_pushers, get_pushrule, get_pushrule_actions,
        get_pushrule_enabled, get_pushrules_all, get_pushrules_global_scope, set_pusher,
        set_pushrule_actions, set_pushrule_enabled, Pusher,
    },
    push::{
        Action, NewConditionalPushRule, NewPatternedPushRule, NewPushRule, NewSimplePushRule,
        PushCondition,
    },
    MilliSecondsSinceUnixEpoch, OwnedRoomId, OwnedUserId, UInt,
};
use serde_json::{json, Map, Value};

use super::account::{query_param, Segs};
use crate::{
    api::ruma_wrapper::{ruma_route, Authed, JsonBody, Ruma, RumaResponse},
    error::{Error, Result},
    service::{
        push::rules::{insert_error, remove_error},
        Services,
    },
};

/// `/notifications` page size when the client names none, and the most it may ask for.
const DEFAULT_NOTIFICATIONS: usize = 20;
const MAX_NOTIFICATIONS: usize = 100;

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = ruma_route::<get_pushrules_all::v3::Request, _, _>(r, all);
    let r = ruma_route::<get_pushrules_global_scope::v3::Request, _, _>(r, global);
    let r = ruma_route::<get_pushrule::v3::Request, _, _>(r, get_rule);
    // Not ruma's request type: it demands `conditions`, which the spec leaves optional.
    let r = r
        .route(
            "/_matrix/client/v3/pushrules/global/{kind}/{rule_id}",
            put(set_rule),
        )
        .route(
            "/_matrix/client/r0/pushrules/global/{kind}/{rule_id}",
            put(set_rule),
        );
    let r = ruma_route::<delete_pushrule::v3::Request, _, _>(r, delete_rule);
    let r = ruma_route::<get_pushrule_actions::v3::Request, _, _>(r, get_actions);
    let r = ruma_route::<set_pushrule_actions::v3::Request, _, _>(r, set_actions);
    let r = ruma_route::<get_pushrule_enabled::v3::Request, _, _>(r, get_enabled);
    let r = ruma_route::<set_pushrule_enabled::v3::Request, _, _>(r, set_enabled);
    let r = ruma_route::<get_pushers::v3::Request, _, _>(r, pushers);
    let r = ruma_route::<set_pusher::v3::Request, _, _>(r, set_pusher);
    ruma_route::<get_notifications::v3::Request, _, _>(r, notifications)
}

async fn all(
    State(s): State<Arc<Services>>,
    req: Ruma<get_pushrules_all::v3::Request>,
) -> Result<RumaResponse<get_pushrules_all::v3::Response>> {
    let rules = s.push.rules.get(&req.user()?.user_id)?;
    Ok(get_pushrules_all::v3::Response::new(rules.set.clone()).into())
}

async fn global(
    State(s): State<Arc<Services>>,
    req: Ruma<get_pushrules_global_scope::v3::Request>,
) -> Result<RumaResponse<get_pushrules_global_scope::v3::Response>> {
    let rules = s.push.rules.get(&req.user()?.user_id)?;
    Ok(get_pushrules_global_scope::v3::Response::new(rules.set.clone()).into())
}

fn rule_not_found() -> Error {
    Error::not_found("The push rule was not found")
}

async fn get_rule(
    State(s): State<Arc<Services>>,
    req: Ruma<get_pushrule::v3::Request>,
) -> Result<RumaResponse<get_pushrule::v3::Response>> {
    let rules = s.push.rules.get(&req.user()?.user_id)?;
    let rule = rules
        .set
        .get(req.body.kind.clone(), &req.body.rule_id)
        .ok_or_else(rule_not_found)?;
    Ok(get_pushrule::v3::Response::new(rule.into()).into())
}

/// `PUT /pushrules/global/{kind}/{ruleId}[?before=&after=]`.
async fn set_rule(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    RawQuery(q): RawQuery,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let rule = new_rule(p.get(0)?, p.get(1)?, body)?;
    let before = query_param(&q, "before")?;
    let after = query_param(&q, "after")?;
    s.push.rules.update(&who.user_id, |rules| {
        rules
            .insert(rule, after.as_deref(), before.as_deref())
            .map_err(insert_error)
    })?;
    Ok(Json(json!({})))
}

/// A rule of `kind` from a request body: `actions` always, `conditions` (default none) for
/// override and underride rules, `pattern` for content rules; room and sender rules are named
/// by their room or user id.
fn new_rule(kind: &str, rule_id: &str, mut body: Map<String, Value>) -> Result<NewPushRule> {
    let field = |body: &mut Map<String, Value>, name: &str| body.remove(name);
    let actions: Vec<Action> = match field(&mut body, "actions") {
        Some(a) => serde_json::from_value(a)
            .map_err(|e| Error::bad_json(format!("Invalid 'actions': {e}")))?,
        None => return Err(Error::bad_json("Missing 'actions'")),
    };
    let id = rule_id.to_owned();
    Ok(match kind {
        "override" | "underride" => {
            let conditions: Vec<PushCondition> = match field(&mut body, "conditions") {
                Some(c) => serde_json::from_value(c)
                    .map_err(|e| Error::bad_json(format!("Invalid 'conditions': {e}")))?,
                None => Vec::new(),
            };
            let rule = NewConditionalPushRule::new(id, conditions, actions);
            if kind == "override" {
                NewPushRule::Override(rule)
            } else {
                NewPushRule::Underride(rule)
            }
        }
        "content" => {
            let Some(Value::String(pattern)) = field(&mut body, "pattern") else {
                return Err(Error::bad_json("Content rules need a string 'pattern'"));
            };
            NewPushRule::Content(NewPatternedPushRule::new(id, pattern, actions))
        }
        "room" => {
            let room = OwnedRoomId::try_from(id)
                .map_err(|_| Error::invalid_param("Room rule ids must be room ids"))?;
            NewPushRule::Room(NewSimplePushRule::new(room, actions))
        }
        "sender" => {
            let user = OwnedUserId::try_from(id)
                .map_err(|_| Error::invalid_param("Sender rule ids must be user ids"))?;
            NewPushRule::Sender(NewSimplePushRule::new(user, actions))
        }
        _ => return Err(Error::invalid_param(format!("Unknown rule kind '{kind}'"))),
    })
}

async fn delete_rule(
    State(s): State<Arc<Services>>,
    req: Ruma<delete_pushrule::v3::Request>,
) -> Result<RumaResponse<delete_pushrule::v3::Response>> {
    let user = req.user()?.user_id.clone();
    let (kind, rule_id) = (req.body.kind, req.body.rule_id);
    s.push.rules.update(&user, |rules| {
        rules.remove(kind, &rule_id).map_err(remove_error)
    })?;
    Ok(delete_pushrule::v3::Response::new().into())
}

async fn get_actions(
    State(s): State<Arc<Services>>,
    req: Ruma<get_pushrule_actions::v3::Request>,
) -> Result<RumaResponse<get_pushrule_actions::v3::Response>> {
    let rules = s.push.rules.get(&req.user()?.user_id)?;
    let rule = rules
        .set
        .get(req.body.kind.clone(), &req.body.rule_id)
        .ok_or_else(rule_not_found)?;
    Ok(get_pushrule_actions::v3::Response::new(rule.actions().to_vec()).into())
}

async fn set_actions(
    State(s): State<Arc<Services>>,
    req: Ruma<set_pushrule_actions::v3::Request>,
) -> Result<RumaResponse<set_pushrule_actions::v3::Response>> {
    let user = req.user()?.user_id.clone();
    let body = req.body;
    s.push.rules.update(&user, |rules| {
        rules
            .set_actions(body.kind, &body.rule_id, body.actions)
            .map_err(|_| rule_not_found())
    })?;
    Ok(set_pushrule_actions::v3::Response::new().into())
}

async fn get_enabled(
    State(s): State<Arc<Services>>,
    req: Ruma<get_pushrule_enabled::v3::Request>,
) -> Result<RumaResponse<get_pushrule_enabled::v3::Response>> {
    let rules = s.push.rules.get(&req.user()?.user_id)?;
    let rule = rules
        .set
        .get(req.body.kind.clone(), &req.body.rule_id)
        .ok_or_else(rule_not_found)?;
    Ok(get_pushrule_enabled::v3::Response::new(rule.enabled()).into())
}

async fn set_enabled(
    State(s): State<Arc<Services>>,
    req: Ruma<set_pushrule_enabled::v3::Request>,
) -> Result<RumaResponse<set_pushrule_enabled::v3::Response>> {
    let user = req.user()?.user_id.clone();
    let body = req.body;
    s.push.rules.update(&user, |rules| {
        rules
            .set_enabled(body.kind, &body.rule_id, body.enabled)
            .map_err(|_| rule_not_found())
    })?;
    Ok(set_pushrule_enabled::v3::Response::new().into())
}

async fn pushers(
    State(s): State<Arc<Services>>,
    req: Ruma<get_pushers::v3::Request>,
) -> Result<RumaResponse<get_pushers::v3::Response>> {
    let list = s
        .push
        .pushers
        .of_user(&req.user()?.user_id)?
        .into_iter()
        .filter_map(|p| serde_json::from_value::<Pusher>(p.pusher).ok())
        .collect();
    Ok(get_pushers::v3::Response::new(list).into())
}

async fn set_pusher(
    State(s): State<Arc<Services>>,
    req: Ruma<set_pusher::v3::Request>,
) -> Result<RumaResponse<set_pusher::v3::Response>> {
    let who = req.user()?.clone();
    match req.body.action {
        set_pusher::v3::PusherAction::Post(data) => s.push.pushers.set(
            &who.user_id,
            who.device_id.as_str(),
            &data.pusher,
            data.append,
        )?,
        set_pusher::v3::PusherAction::Delete(ids) => {
            s.push
                .pushers
                .delete(&who.user_id, &ids.app_id, &ids.pushkey)?
        }
        _ => return Err(Error::bad_json("Unknown pusher action")),
    }
    Ok(set_pusher::v3::Response::new().into())
}

async fn notifications(
    State(s): State<Arc<Services>>,
    req: Ruma<get_notifications::v3::Request>,
) -> Result<RumaResponse<get_notifications::v3::Response>> {
    let who = req.user()?.clone();
    let before = req
        .body
        .from
        .as_deref()
        .map(|f| {
            f.parse::<u64>()
                .map_err(|_| Error::invalid_param("Invalid 'from' token"))
        })
        .transpose()?;
    let limit = req
        .body
        .limit
        .map_or(DEFAULT_NOTIFICATIONS, |l| {
            usize::try_from(u64::from(l)).unwrap_or(MAX_NOTIFICATIONS)
        })
        .clamp(1, MAX_NOTIFICATIONS);
    let only_highlight = req.body.only.as_deref() == Some("highlight");
    let rows = s
        .push
        .notifications
        .list(&who.user_id, before, limit, only_highlight)?;
    let mut out = Vec::with_capacity(rows.len());
    for (count, n) in &rows {
        let Some(pdu) = s.rooms.pdu(n.event_id.as_str())? else {
            continue;
        };
        // Recorded while the user was in the room; still judged like every event served.
        if !s.rooms.user_may_see(&n.room_id, &who.user_id, &pdu)? {
            continue;
        }
        let event = s
            .rooms
            .client_event_for(&pdu, &who.user_id, who.device_id.as_str())?;
        let read = !s
            .push
            .notifications
            .is_unread(&who.user_id, &n.room_id, *count)?;
        out.push(get_notifications::v3::Notification::new(
            n.actions.clone(),
            ruma::serde::Raw::new(&event)?.cast_unchecked(),
            read,
            n.room_id.clone(),
            MilliSecondsSinceUnixEpoch(UInt::new_saturating(n.ts)),
        ));
    }
    let mut resp = get_notifications::v3::Response::new(out);
    if rows.len() >= limit {
        resp.next_token = rows.last().map(|(c, _)| c.to_string());
    }
    Ok(resp.into())
}
