//! The end-to-end encryption endpoints' logic across services: keys, device records, rooms (who
//! shares a room with whom) and the stream counter (waking the syncs that must see a change).
//! Keys of users on other servers are answered as failures until federation lands.

use std::collections::BTreeMap;

use ruma::{OwnedDeviceId, OwnedUserId, UserId};
use serde_json::{json, Map, Value};

use crate::{
    error::{ErrCode, Error, Result},
    service::{
        accounts::Identity,
        keys::{CrossSigning, ListChange},
        sync::room_mates,
        to_device::recipients_for,
        Services,
    },
};

/// Most users one `/keys/query` or `/keys/claim` may name.
pub const MAX_USERS_PER_REQUEST: usize = 1000;
/// Most devices one `/keys/claim` may name in all.
pub const MAX_CLAIMS_PER_REQUEST: usize = 10_000;

fn object<'a>(body: &'a Map<String, Value>, key: &str) -> Result<Option<&'a Map<String, Value>>> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err(Error::bad_json(format!("{key} must be an object"))),
    }
}

/// A user id named in a request body.
fn parse_user(raw: &str) -> Result<OwnedUserId> {
    UserId::parse(raw).map_err(|_| Error::invalid_param(format!("Invalid user id {raw}")))
}

/// Whether the user lives on another server (asked over federation by the `_federated` entry
/// points; the local functions answer a failure for them).
fn is_remote(s: &Services, user: &UserId) -> bool {
    *user.server_name() != *s.globals.server_name
}

/// The `failures` entry for a server we cannot reach.
fn unreachable() -> Value {
    json!({ "status": 503, "message": "Federation is not available" })
}

/// `POST /keys/upload`.
pub fn upload_keys(s: &Services, who: &Identity, body: &Map<String, Value>) -> Result<Value> {
    let device_keys = object(body, "device_keys")?;
    let one_time_keys = object(body, "one_time_keys")?;
    let fallback_keys = object(body, "fallback_keys")?;
    let pending = s.globals.counter.next()?;
    let uploaded = s.keys.upload(
        &who.user_id,
        &who.device_id,
        device_keys,
        one_time_keys,
        fallback_keys,
        pending.get(),
    )?;
    let wake = if uploaded.device_keys_changed {
        room_mates(s, &who.user_id)?
    } else {
        Vec::new()
    };
    let count = pending.get();
    pending.finish(wake);
    if uploaded.device_keys_changed {
        if let Err(e) = crate::service::federation::edu::send_device_list_update(
            s,
            &who.user_id,
            &who.device_id,
            false,
            count,
        ) {
            tracing::warn!("queueing a device list update: {e}");
        }
    }
    Ok(json!({ "one_time_key_counts": uploaded.one_time_key_counts }))
}

/// `POST /keys/query`: device keys and cross-signing keys of local users. The requester sees
/// their own user-signing key only.
pub fn query_keys(s: &Services, who: &Identity, body: &Map<String, Value>) -> Result<Value> {
    query_keys_for(s, Some(&who.user_id), body)
}

/// `/keys/query` for `viewer` (None: another server asking, which never sees user-signing
/// keys). Users of other servers are answered with a failure for their server.
pub fn query_keys_for(
    s: &Services,
    viewer: Option<&UserId>,
    body: &Map<String, Value>,
) -> Result<Value> {
    let wanted = object(body, "device_keys")?
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing device_keys"))?;
    if wanted.len() > MAX_USERS_PER_REQUEST {
        return Err(Error::new(
            ErrCode::TooLarge,
            format!("At most {MAX_USERS_PER_REQUEST} users per request"),
        ));
    }
    let mut device_keys = Map::new();
    let mut master_keys = Map::new();
    let mut self_signing_keys = Map::new();
    let mut user_signing_keys = Map::new();
    let mut failures = Map::new();
    for (user, devices) in wanted {
        let user_id = parse_user(user)?;
        let devices: Vec<&str> = match devices {
            Value::Array(a) => a
                .iter()
                .map(|d| {
                    d.as_str()
                        .ok_or_else(|| Error::bad_json("Device ids must be strings"))
                })
                .collect::<Result<_>>()?,
            Value::Null => Vec::new(),
            _ => return Err(Error::bad_json("device_keys values must be lists")),
        };
        if is_remote(s, &user_id) {
            failures.insert(user_id.server_name().to_string(), unreachable());
            continue;
        }
        let display_names: BTreeMap<String, Option<String>> = s
            .accounts
            .devices(&user_id)?
            .into_iter()
            .map(|d| (d.device_id.to_string(), d.display_name))
            .collect();
        let mut per_user = Map::new();
        for (device, mut keys) in s.keys.all_device_keys(&user_id)? {
            if !devices.is_empty() && !devices.contains(&device.as_str()) {
                continue;
            }
            // Another server asking (no viewer) gets device names only when the operator
            // allows it: they often name the person's phone or computer.
            let names_allowed = viewer.is_some() || s.config.allow_device_name_federation;
            if let (true, Some(Some(name))) = (names_allowed, display_names.get(&device)) {
                keys["unsigned"] = json!({ "device_display_name": name });
            }
            per_user.insert(device, keys);
        }
        device_keys.insert(user.clone(), Value::Object(per_user));
        if let Some(k) = s.keys.cross_signing_key(&user_id, CrossSigning::Master)? {
            master_keys.insert(user.clone(), k);
        }
        if let Some(k) = s
            .keys
            .cross_signing_key(&user_id, CrossSigning::SelfSigning)?
        {
            self_signing_keys.insert(user.clone(), k);
        }
        if viewer == Some(&*user_id) {
            if let Some(k) = s
                .keys
                .cross_signing_key(&user_id, CrossSigning::UserSigning)?
            {
                user_signing_keys.insert(user.clone(), k);
            }
        }
    }
    Ok(json!({
        "device_keys": device_keys,
        "master_keys": master_keys,
        "self_signing_keys": self_signing_keys,
        "user_signing_keys": user_signing_keys,
        "failures": failures,
    }))
}

/// `POST /keys/claim`: one key per named device, a one-time key while any is left.
pub fn claim_keys(s: &Services, body: &Map<String, Value>) -> Result<Value> {
    let wanted = object(body, "one_time_keys")?
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing one_time_keys"))?;
    if wanted.len() > MAX_USERS_PER_REQUEST {
        return Err(Error::new(
            ErrCode::TooLarge,
            format!("At most {MAX_USERS_PER_REQUEST} users per request"),
        ));
    }
    let total: usize = wanted
        .values()
        .map(|d| d.as_object().map_or(0, Map::len))
        .sum();
    if total > MAX_CLAIMS_PER_REQUEST {
        return Err(Error::new(
            ErrCode::TooLarge,
            format!("At most {MAX_CLAIMS_PER_REQUEST} devices per request"),
        ));
    }
    let mut out = Map::new();
    let mut failures = Map::new();
    for (user, devices) in wanted {
        let user_id = parse_user(user)?;
        let devices = devices
            .as_object()
            .ok_or_else(|| Error::bad_json("one_time_keys values must be objects"))?;
        if is_remote(s, &user_id) {
            failures.insert(user_id.server_name().to_string(), unreachable());
            continue;
        }
        let mut per_user = Map::new();
        for (device, algorithm) in devices {
            let algorithm = algorithm
                .as_str()
                .ok_or_else(|| Error::bad_json("Algorithms must be strings"))?;
            let device_id: OwnedDeviceId = device.as_str().into();
            if let Some((key_id, key)) = s.keys.claim(&user_id, &device_id, algorithm)? {
                per_user.insert(device.clone(), json!({ key_id: key }));
            }
        }
        if !per_user.is_empty() {
            out.insert(user.clone(), Value::Object(per_user));
        }
    }
    Ok(json!({ "one_time_keys": out, "failures": failures }))
}

/// `POST /keys/device_signing/upload`, after the caller decided about user-interactive auth.
pub fn upload_cross_signing(s: &Services, user: &UserId, body: &Map<String, Value>) -> Result<()> {
    let master = object(body, "master_key")?;
    let self_signing = object(body, "self_signing_key")?;
    let user_signing = object(body, "user_signing_key")?;
    let pending = s.globals.counter.next()?;
    s.keys
        .set_cross_signing(user, master, self_signing, user_signing, pending.get())?;
    pending.finish(room_mates(s, user)?);
    if master.is_some() || self_signing.is_some() {
        if let Err(e) = crate::service::federation::edu::send_signing_key_update(s, user) {
            tracing::warn!("queueing a signing key update: {e}");
        }
    }
    Ok(())
}

/// Whether this cross-signing upload needs user-interactive auth (see the spec's exemptions).
pub fn cross_signing_needs_auth(
    s: &Services,
    user: &UserId,
    body: &Map<String, Value>,
) -> Result<bool> {
    let given = [
        (CrossSigning::Master, object(body, "master_key")?),
        (CrossSigning::SelfSigning, object(body, "self_signing_key")?),
        (CrossSigning::UserSigning, object(body, "user_signing_key")?),
    ];
    s.keys.cross_signing_needs_auth(user, &given)
}

/// `POST /keys/signatures/upload`: per key, added or a failure.
pub fn upload_signatures(s: &Services, who: &Identity, body: &Map<String, Value>) -> Result<Value> {
    if body.len() > MAX_USERS_PER_REQUEST {
        return Err(Error::new(
            ErrCode::TooLarge,
            format!("At most {MAX_USERS_PER_REQUEST} users per request"),
        ));
    }
    let mut failures = Map::new();
    let mut touched: Vec<OwnedUserId> = Vec::new();
    for (user, signed_keys) in body {
        let target = parse_user(user)?;
        let signed_keys = signed_keys
            .as_object()
            .ok_or_else(|| Error::bad_json("Values must be objects of signed keys"))?;
        for (key_id, signed) in signed_keys {
            let result = match signed.as_object() {
                Some(signed) => s.keys.add_signatures(&who.user_id, &target, key_id, signed),
                None => Err(Error::bad_json("A signed key must be an object")),
            };
            match result {
                Ok(_) => {
                    if !touched.contains(&target) {
                        touched.push(target.clone());
                    }
                }
                Err(Error::Matrix { code, message, .. }) => {
                    let per_user = failures
                        .entry(user.clone())
                        .or_insert_with(|| Value::Object(Map::new()));
                    if let Some(o) = per_user.as_object_mut() {
                        o.insert(
                            key_id.clone(),
                            json!({ "errcode": code.as_str(), "error": message }),
                        );
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
    if !touched.is_empty() {
        // New signatures change what /keys/query returns: a device-list change of each target.
        let pending = s.globals.counter.next()?;
        let changes: Vec<ListChange> = touched
            .iter()
            .map(|u| ListChange::Keys { user: u.clone() })
            .collect();
        let mut b = s.storage.batch();
        crate::service::keys::log_changes(&mut b, pending.get(), &changes)?;
        b.commit()?;
        let mut wake = room_mates(s, &who.user_id)?;
        for u in &touched {
            if !is_remote(s, u) {
                wake.extend(room_mates(s, u)?);
            }
        }
        wake.sort();
        wake.dedup();
        pending.finish(wake);
    }
    Ok(json!({ "failures": failures }))
}

/// `PUT /sendToDevice/{type}/{txnId}`.
pub fn send_to_device(
    s: &Services,
    who: &Identity,
    kind: &str,
    txn_id: &str,
    body: &Map<String, Value>,
) -> Result<()> {
    let messages = object(body, "messages")?
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing messages"))?;
    let mut recipients = Vec::new();
    let mut remote: BTreeMap<ruma::OwnedServerName, Map<String, Value>> = BTreeMap::new();
    let mut remote_count = 0;
    let mut remote_users: Vec<ruma::OwnedUserId> = Vec::new();
    for (user, devices) in messages {
        let user_id = parse_user(user)?;
        let devices = devices
            .as_object()
            .ok_or_else(|| Error::bad_json("messages values must be objects"))?;
        if is_remote(s, &user_id) {
            // For the user's server: queued (in this request's batch) as m.direct_to_device.
            if devices.values().any(|c| !c.is_object()) {
                return Err(Error::bad_json("Message contents must be objects"));
            }
            remote_count += devices.len();
            if remote_count > crate::service::to_device::MAX_RECIPIENTS {
                return Err(Error::new(
                    ErrCode::TooLarge,
                    "Too many devices in one request",
                ));
            }
            remote
                .entry(user_id.server_name().to_owned())
                .or_default()
                .insert(user.clone(), Value::Object(devices.clone()));
            remote_users.push(user_id);
            continue;
        }
        for (device, content) in devices {
            if !content.is_object() {
                return Err(Error::bad_json("Message contents must be objects"));
            }
            recipients_for(&s.accounts, &user_id, device, content, &mut recipients)?;
        }
    }
    let edus = crate::service::federation::edu::to_device_edus(&who.user_id, kind, remote)?;
    let sender = &s.federation.sender;
    let queued = s.to_device.send_with(
        &who.user_id,
        &who.device_id,
        txn_id,
        kind,
        recipients,
        &remote_users.iter().map(|u| &**u).collect::<Vec<_>>(),
        |batch| {
            for (server, edu) in &edus {
                sender.queue_edu(batch, server, edu)?;
            }
            Ok(())
        },
    )?;
    if queued && !edus.is_empty() {
        sender.wake.add(edus.into_iter().map(|(server, _)| server));
    }
    Ok(())
}

/// Most servers one `/keys/query` or `/keys/claim` asks over federation.
const MAX_REMOTE_SERVERS: usize = 20;

/// The users of `field` in `body` grouped by their (remote) server.
fn remote_by_server(
    s: &Services,
    body: &Map<String, Value>,
    field: &str,
) -> BTreeMap<ruma::OwnedServerName, Map<String, Value>> {
    let mut out: BTreeMap<ruma::OwnedServerName, Map<String, Value>> = BTreeMap::new();
    if let Some(Value::Object(users)) = body.get(field) {
        for (user, v) in users {
            if let Ok(u) = UserId::parse(user.as_str()) {
                if is_remote(s, &u) {
                    out.entry(u.server_name().to_owned())
                        .or_default()
                        .insert(user.clone(), v.clone());
                }
            }
        }
    }
    out
}

/// Ask each remote server named in the request (federation `/user/keys/{query,claim}`) and
/// merge its answer into the local one: `fields` are the per-user maps merged; a server that
/// cannot be asked becomes a `failures` entry.
async fn merge_remote(
    s: &Services,
    body: &Map<String, Value>,
    field: &str,
    path: &str,
    fields: &[&str],
    answer: &mut Value,
) -> Result<()> {
    for (server, users) in remote_by_server(s, body, field)
        .into_iter()
        .take(MAX_REMOTE_SERVERS)
    {
        let request = json!({ field: users.clone() });
        match s
            .federation
            .send(http::Method::POST, &server, path, Some(request))
            .await
        {
            Ok(remote) => {
                for f in fields {
                    if let (Some(Value::Object(from)), Some(Value::Object(into))) =
                        (remote.get(*f), answer.get_mut(*f))
                    {
                        // Only what was asked of that server, about its own users: a server
                        // cannot answer for anybody else's keys.
                        for (k, v) in from.iter().filter(|(k, _)| users.contains_key(*k)) {
                            into.insert(k.clone(), v.clone());
                        }
                    }
                }
                if let Some(Value::Object(failures)) = answer.get_mut("failures") {
                    failures.remove(server.as_str());
                }
            }
            Err(e) => {
                if let Some(Value::Object(failures)) = answer.get_mut("failures") {
                    failures.insert(
                        server.to_string(),
                        json!({ "status": 503, "message": e.to_string() }),
                    );
                }
            }
        }
    }
    Ok(())
}

/// `POST /keys/query` including users of other servers (asked over federation).
pub async fn query_keys_federated(
    s: &Services,
    who: &Identity,
    body: &Map<String, Value>,
) -> Result<Value> {
    let mut answer = query_keys(s, who, body)?;
    merge_remote(
        s,
        body,
        "device_keys",
        "/_matrix/federation/v1/user/keys/query",
        &["device_keys", "master_keys", "self_signing_keys"],
        &mut answer,
    )
    .await?;
    Ok(answer)
}

/// `POST /keys/claim` including devices of other servers (claimed over federation).
pub async fn claim_keys_federated(s: &Services, body: &Map<String, Value>) -> Result<Value> {
    let mut answer = claim_keys(s, body)?;
    merge_remote(
        s,
        body,
        "one_time_keys",
        "/_matrix/federation/v1/user/keys/claim",
        &["one_time_keys"],
        &mut answer,
    )
    .await?;
    Ok(answer)
}
