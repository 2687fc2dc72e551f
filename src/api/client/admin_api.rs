//! The admin API: the audit log and the register of third-party services
//! (`/_hafen/admin/v1/audit`, `/_hafen/admin/v1/destinations`), and Synapse's admin endpoints for
//! users, their devices, whois and registration tokens at Synapse's paths with Synapse's request
//! and response shapes (`/_synapse/admin/...`), so existing admin tools work. Every call needs a
//! server admin's token (403 `M_FORBIDDEN` otherwise) and is written to the audit log
//! (`admin_action`: the endpoint, the target, whether it was allowed).

use std::sync::Arc;

use axum::{
    extract::{RawQuery, State},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
    Json, Router,
};
use http::{header, HeaderValue, StatusCode};
use ruma::OwnedUserId;
use serde_json::{json, Map, Value};

use super::account::{query_param, uint_param, Segs};
use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{ErrCode, Error, Result},
    policy::audit::{AuditEntry, Filter},
    service::{
        accounts::{DeviceRecord, Identity, RegistrationToken, UserRecord},
        Services,
    },
    utils,
};

/// Entries per page of the JSON audit query: default and most.
const AUDIT_PAGE: usize = 100;
const AUDIT_PAGE_MAX: usize = 1000;
/// Entries per export (JSON lines, CSV): default and most.
const EXPORT_DEFAULT: usize = 10_000;
const EXPORT_MAX: usize = 100_000;
/// Rows one audit request reads at most (filters that match little end a page early with a
/// `next` token rather than reading the whole log).
const MAX_SCAN: usize = 200_000;
/// Users per page of the user list: default and most.
const USERS_PAGE: usize = 100;
const USERS_PAGE_MAX: usize = 1000;
/// Most devices one `delete_devices` call may name.
const MAX_DELETE: usize = 1000;

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route("/_hafen/admin/v1/audit", get(audit))
        .route("/_hafen/admin/v1/destinations", get(destinations))
        .route(
            "/_hafen/admin/v1/backup",
            axum::routing::post(backup).get(list_backups),
        )
        .route("/_synapse/admin/v2/users", get(list_users))
        .route("/_synapse/admin/v2/users/{user_id}", get(query_user))
        .route(
            "/_synapse/admin/v2/users/{user_id}/devices",
            get(list_devices),
        )
        .route(
            "/_synapse/admin/v2/users/{user_id}/devices/{device_id}",
            delete(delete_device),
        )
        .route(
            "/_synapse/admin/v2/users/{user_id}/delete_devices",
            post(delete_devices),
        )
        .route("/_synapse/admin/v1/whois/{user_id}", get(whois))
        .route("/_synapse/admin/v1/registration_tokens", get(list_tokens))
        .route(
            "/_synapse/admin/v1/registration_tokens/new",
            post(new_token),
        )
        .route(
            "/_synapse/admin/v1/registration_tokens/{token}",
            get(get_token).put(update_token).delete(delete_token),
        )
}

/// Write an `admin_action` entry: who called which endpoint about what, and whether it was
/// allowed. `target` is a user, device or room id, never a secret.
pub(crate) fn audit_admin(
    s: &Services,
    who: &Identity,
    endpoint: &str,
    target: Option<&str>,
    allowed: bool,
) {
    let mut e = s.audit.entry(
        "admin_action",
        Some(who.user_id.as_str()),
        Some(who.device_id.as_str()),
    );
    let mut detail = json!({ "endpoint": endpoint, "allowed": allowed });
    if let Some(t) = target {
        detail["target"] = json!(t.chars().take(255).collect::<String>());
    }
    e.detail = detail;
    s.audit.note(e);
}

/// The caller must be a server admin; the call is audited either way.
pub(super) fn require_admin(
    s: &Services,
    who: &Identity,
    endpoint: &str,
    target: Option<&str>,
) -> Result<()> {
    audit_admin(s, who, endpoint, target, who.admin);
    if who.admin {
        Ok(())
    } else {
        Err(Error::forbidden("You are not a server admin"))
    }
}

/// A local user id from the path (`M_INVALID_PARAM` when not one).
pub(super) fn local_user(s: &Services, raw: &str) -> Result<OwnedUserId> {
    let user = super::user_id(raw)?;
    if user.server_name() != s.globals.server_name {
        return Err(Error::invalid_param("Can only look up local users"));
    }
    Ok(user)
}

pub(super) fn known_user(s: &Services, user: &ruma::UserId) -> Result<UserRecord> {
    s.accounts
        .user(user)?
        .ok_or_else(|| Error::not_found("User not found"))
}

// The audit log.

/// A millisecond timestamp query parameter.
fn ts_param(q: &Option<String>, key: &str) -> Result<Option<u64>> {
    query_param(q, key)?
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| Error::invalid_param(format!("{key} must be a time in ms")))
        })
        .transpose()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 64 {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok())
        .collect()
}

/// `GET /_hafen/admin/v1/audit?user=&device=&room=&kind=&from=&to=&limit=&since=&format=`:
/// entries oldest first; `format` is `json` (default: `{"entries": [...], "next": token}`),
/// `jsonl` (one entry per line) or `csv`; exports carry the next token in `X-Hafen-Next`.
async fn audit(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    let user = query_param(&q, "user")?;
    require_admin(&s, &who, "GET /_hafen/admin/v1/audit", user.as_deref())?;
    let format = query_param(&q, "format")?.unwrap_or_else(|| "json".into());
    let (default, max) = match format.as_str() {
        "json" => (AUDIT_PAGE, AUDIT_PAGE_MAX),
        "jsonl" | "csv" => (EXPORT_DEFAULT, EXPORT_MAX),
        _ => return Err(Error::invalid_param("format must be json, jsonl or csv")),
    };
    let limit = uint_param(&q, "limit", default)?.clamp(1, max);
    let filter = Filter {
        user,
        device: query_param(&q, "device")?,
        room: query_param(&q, "room")?,
        kind: query_param(&q, "kind")?,
        from: ts_param(&q, "from")?.unwrap_or(0),
        to: ts_param(&q, "to")?.unwrap_or(u64::MAX),
    };
    let since = match query_param(&q, "since")? {
        Some(t) => Some(unhex(&t).ok_or_else(|| Error::invalid_param("Invalid 'since' token"))?),
        None => None,
    };
    let (entries, next) = s.audit.search(&filter, since.as_deref(), limit, MAX_SCAN)?;
    let next = next.map(|k| hex(&k));
    match format.as_str() {
        "jsonl" => {
            let mut body = String::new();
            for e in &entries {
                body.push_str(&serde_json::to_string(e)?);
                body.push('\n');
            }
            Ok(export(body, "application/x-ndjson", next))
        }
        "csv" => Ok(export(to_csv(&entries), "text/csv; charset=utf-8", next)),
        _ => {
            let mut v = json!({ "entries": entries });
            if let Some(n) = next {
                v["next"] = json!(n);
            }
            Ok(Json(v).into_response())
        }
    }
}

fn export(body: String, content_type: &'static str, next: Option<String>) -> Response {
    let mut res = Response::new(axum::body::Body::from(body));
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(n) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        res.headers_mut().insert("x-hafen-next", n);
    }
    res
}

/// The CSV columns of an export.
const CSV_HEADER: &str = "ts,kind,user,device,ip,user_agent,room,detail";

/// Entries as CSV (RFC 4180: fields with a comma, quote or line break are quoted, quotes
/// doubled; lines end in CRLF). A field starting with `=`, `+`, `-`, `@`, tab or CR gets a
/// leading `'` (Matrix ids excepted), so a spreadsheet does not run a user agent or an attempted
/// user name as a formula.
fn to_csv(entries: &[AuditEntry]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push_str("\r\n");
    for e in entries {
        let detail = if e.detail.is_null() {
            String::new()
        } else {
            e.detail.to_string()
        };
        let fields = [
            e.ts.to_string(),
            e.kind.clone(),
            e.user.clone().unwrap_or_default(),
            e.device.clone().unwrap_or_default(),
            e.ip.clone().unwrap_or_default(),
            e.user_agent.clone().unwrap_or_default(),
            e.room.clone().unwrap_or_default(),
            detail,
        ];
        let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&line.join(","));
        out.push_str("\r\n");
    }
    out
}

pub(crate) fn csv_field(f: &str) -> String {
    let mut f = f.to_owned();
    // Matrix ids (`@user:server`) start with `@` but cannot call anything: no parentheses,
    // no `|` or `!`; they stay as they are.
    let matrix_id = f.starts_with('@')
        && f.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._=/+-@:[]".contains(&b));
    if f.starts_with(['=', '+', '-', '@', '\t', '\r']) && !matrix_id {
        f.insert(0, '\'');
    }
    if f.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", f.replace('"', "\"\""))
    } else {
        f
    }
}

/// `GET /_hafen/admin/v1/destinations`: the register of third-party services contacted.
async fn destinations(State(s): State<Arc<Services>>, Authed(who): Authed) -> Result<Json<Value>> {
    require_admin(&s, &who, "GET /_hafen/admin/v1/destinations", None)?;
    let list = s.register.list()?;
    Ok(Json(json!({ "destinations": list, "total": list.len() })))
}

/// `POST /_hafen/admin/v1/backup`: an online backup of the database and media now (A7).
async fn backup(State(s): State<Arc<Services>>, Authed(who): Authed) -> Result<Json<Value>> {
    require_admin(&s, &who, "POST /_hafen/admin/v1/backup", None)?;
    let path = crate::service::backup::run(&s, crate::service::backup::Trigger::Request).await?;
    Ok(Json(json!({
        "path": path.display().to_string(),
        "encrypted": s.backups.encrypted(),
    })))
}

/// `GET /_hafen/admin/v1/backup`: the backups below `backup_path` (newest first), the outcome
/// of the last run and the schedule.
async fn list_backups(State(s): State<Arc<Services>>, Authed(who): Authed) -> Result<Json<Value>> {
    require_admin(&s, &who, "GET /_hafen/admin/v1/backup", None)?;
    let backups = match s.config.backup_path.clone() {
        Some(root) => tokio::task::spawn_blocking(move || crate::service::backup::list(&root))
            .await
            .map_err(Error::internal)??,
        None => Vec::new(),
    };
    Ok(Json(json!({
        "backup_path": s.config.backup_path.as_ref().map(|p| p.display().to_string()),
        "encrypted": s.backups.encrypted(),
        "interval_secs": s.config.backup_interval_secs,
        "keep": s.config.backup_keep,
        "last_run": s.backups.last_run(),
        "backups": backups,
    })))
}

// Synapse's user admin API.

fn user_json(s: &Services, user: &ruma::UserId, rec: &UserRecord) -> Result<Map<String, Value>> {
    let profile =
        |field: &str| -> Result<Value> { Ok(s.profiles.get(user, field)?.unwrap_or(Value::Null)) };
    let v = json!({
        "name": user,
        "displayname": profile("displayname")?,
        "avatar_url": profile("avatar_url")?,
        "is_guest": rec.guest,
        "admin": rec.admin,
        "deactivated": rec.deactivated,
        "erased": false,
        "shadow_banned": false,
        "locked": rec.locked,
        "suspended": rec.suspended,
        "user_type": null,
        "creation_ts": rec.created_ms,
    });
    match v {
        Value::Object(m) => Ok(m),
        _ => Ok(Map::new()),
    }
}

/// `GET /_synapse/admin/v2/users`: local users, filtered and ordered as Synapse documents it:
/// `name` (substring of the user id or display name; `user_id` is ignored with it), `user_id`
/// (substring of the user id), `guests` (false leaves guests out), `deactivated` (true includes
/// deactivated users), `admins` (true: only admins, false: no admins), `order_by` and `dir`
/// (`f`/`b`); `from` (an offset) and `limit`. `next_token` when more follow; `total` counts
/// all that match.
async fn list_users(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    require_admin(&s, &who, "GET /_synapse/admin/v2/users", None)?;
    let from = uint_param(&q, "from", 0)?;
    let limit = uint_param(&q, "limit", USERS_PAGE)?.min(USERS_PAGE_MAX);
    let flag = |key: &str| -> Result<Option<bool>> {
        match query_param(&q, key)?.as_deref() {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(_) => Err(Error::invalid_param(format!("{key} must be true or false"))),
        }
    };
    let guests = flag("guests")?.unwrap_or(true);
    let deactivated = flag("deactivated")?.unwrap_or(false);
    let admins = flag("admins")?;
    let name = query_param(&q, "name")?
        .filter(|n| !n.is_empty())
        .map(|n| n.to_lowercase());
    let user_id = query_param(&q, "user_id")?
        .filter(|n| !n.is_empty())
        .map(|n| n.to_lowercase());
    let order_by = query_param(&q, "order_by")?.unwrap_or_else(|| "name".to_owned());
    if !USERS_ORDER.contains(&order_by.as_str()) {
        return Err(Error::invalid_param(format!(
            "Unknown value for order_by: {order_by}"
        )));
    }
    let backwards = match query_param(&q, "dir")?.as_deref() {
        None | Some("f") => false,
        Some("b") => true,
        Some(_) => {
            return Err(Error::invalid_param(
                "Unknown direction: dir must be f or b",
            ))
        }
    };
    let displayname = |user: &ruma::UserId| -> Result<Option<String>> {
        Ok(s.profiles
            .get(user, "displayname")?
            .and_then(|v| v.as_str().map(str::to_owned)))
    };
    let mut matching: Vec<(OwnedUserId, UserRecord, SortKey)> = Vec::new();
    for item in s.storage.scan_prefix(crate::storage::Table::Users, b"")? {
        let (k, v) = item?;
        let rec: UserRecord = serde_json::from_slice(&v)?;
        if (!guests && rec.guest)
            || (!deactivated && rec.deactivated)
            || admins.is_some_and(|a| a != rec.admin)
        {
            continue;
        }
        let Ok(localpart) = std::str::from_utf8(&k) else {
            continue;
        };
        let Ok(user) = ruma::UserId::parse_with_server_name(localpart, &s.globals.server_name)
        else {
            continue;
        };
        if let Some(n) = &name {
            let in_id = user.as_str().to_lowercase().contains(n.as_str());
            if !in_id && !displayname(&user)?.is_some_and(|d| d.to_lowercase().contains(n.as_str()))
            {
                continue;
            }
        } else if let Some(u) = &user_id {
            if !user.as_str().to_lowercase().contains(u.as_str()) {
                continue;
            }
        }
        let key = match order_by.as_str() {
            "creation_ts" => SortKey::Num(rec.created_ms),
            "admin" => SortKey::Num(u64::from(rec.admin)),
            "is_guest" => SortKey::Num(u64::from(rec.guest)),
            "deactivated" => SortKey::Num(u64::from(rec.deactivated)),
            "locked" => SortKey::Num(u64::from(rec.locked)),
            "displayname" => SortKey::Text(displayname(&user)?.unwrap_or_default()),
            "avatar_url" => SortKey::Text(
                s.profiles
                    .get(&user, "avatar_url")?
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            ),
            _ => SortKey::Text(String::new()),
        };
        matching.push((user, rec, key));
    }
    // Synapse: by the column in `dir`, then by user id.
    matching.sort_by(|a, b| {
        let first = if backwards {
            b.2.cmp(&a.2)
        } else {
            a.2.cmp(&b.2)
        };
        let by_name = if backwards && order_by == "name" {
            b.0.cmp(&a.0)
        } else {
            a.0.cmp(&b.0)
        };
        first.then(by_name)
    });
    let total = matching.len();
    let mut users = Vec::new();
    for (user, rec, _) in matching.iter().skip(from).take(limit) {
        users.push(Value::Object(user_json(&s, user, rec)?));
    }
    let mut v = json!({ "users": users, "total": total });
    if from + users.len() < total {
        v["next_token"] = json!((from + users.len()).to_string());
    }
    Ok(Json(v))
}

/// The `order_by` values of Synapse's user list that Hafen has data for (`user_type`,
/// `shadow_banned` and `last_seen_ts` are not kept per user here).
const USERS_ORDER: &[&str] = &[
    "name",
    "creation_ts",
    "displayname",
    "avatar_url",
    "admin",
    "is_guest",
    "deactivated",
    "locked",
];

#[derive(PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum SortKey {
    Num(u64),
    Text(String),
}

/// `GET /_synapse/admin/v2/users/{userId}`.
async fn query_user(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    let raw = p.get(0)?;
    require_admin(&s, &who, "GET /_synapse/admin/v2/users/{userId}", Some(raw))?;
    let user = local_user(&s, raw)?;
    let rec = known_user(&s, &user)?;
    let mut v = user_json(&s, &user, &rec)?;
    v.insert("threepids".into(), json!([]));
    v.insert("external_ids".into(), json!([]));
    v.insert("appservice_id".into(), Value::Null);
    v.insert("consent_server_notice_sent".into(), Value::Null);
    v.insert("consent_version".into(), Value::Null);
    v.insert("consent_ts".into(), Value::Null);
    let last_seen = s
        .accounts
        .devices(&user)?
        .iter()
        .filter_map(|d| d.last_seen_ts)
        .max();
    v.insert("last_seen_ts".into(), json!(last_seen));
    Ok(Json(Value::Object(v)))
}

fn device_json(user: &ruma::UserId, d: &DeviceRecord) -> Value {
    json!({
        "device_id": d.device_id,
        "display_name": d.display_name,
        "last_seen_ip": d.last_seen_ip,
        "last_seen_ts": d.last_seen_ts,
        "last_seen_user_agent": d.last_seen_user_agent,
        "user_id": user,
    })
}

/// `GET /_synapse/admin/v2/users/{userId}/devices`.
async fn list_devices(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    let raw = p.get(0)?;
    require_admin(
        &s,
        &who,
        "GET /_synapse/admin/v2/users/{userId}/devices",
        Some(raw),
    )?;
    let user = local_user(&s, raw)?;
    known_user(&s, &user)?;
    let devices: Vec<Value> = s
        .accounts
        .devices(&user)?
        .iter()
        .map(|d| device_json(&user, d))
        .collect();
    Ok(Json(json!({ "total": devices.len(), "devices": devices })))
}

/// Log a device out: its tokens, keys and to-device inbox go; other servers hear of it.
fn remove_device(s: &Services, user: &ruma::UserId, device: &str) -> Result<()> {
    if let Some(count) = s.accounts.remove_device(user, device.into())? {
        crate::service::federation::edu::device_deleted(s, user, device.into(), count);
    }
    Ok(())
}

/// `DELETE /_synapse/admin/v2/users/{userId}/devices/{deviceId}`: `{}`, also when there was
/// no such device.
async fn delete_device(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    let raw = p.get(0)?;
    let device = p.get(1)?;
    require_admin(
        &s,
        &who,
        "DELETE /_synapse/admin/v2/users/{userId}/devices/{deviceId}",
        Some(&format!("{raw} {device}")),
    )?;
    let user = local_user(&s, raw)?;
    known_user(&s, &user)?;
    remove_device(&s, &user, device)?;
    Ok(Json(json!({})))
}

/// `POST /_synapse/admin/v2/users/{userId}/delete_devices` with `{"devices": [...]}`.
async fn delete_devices(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let raw = p.get(0)?;
    require_admin(
        &s,
        &who,
        "POST /_synapse/admin/v2/users/{userId}/delete_devices",
        Some(raw),
    )?;
    let user = local_user(&s, raw)?;
    known_user(&s, &user)?;
    let devices = match body.get("devices") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(Error::bad_json("'devices' must be an array of strings")),
        None => return Err(Error::new(ErrCode::MissingParam, "Missing 'devices'")),
    };
    if devices.len() > MAX_DELETE {
        return Err(Error::invalid_param("Too many devices in one request"));
    }
    let mut ids = Vec::with_capacity(devices.len());
    for d in devices {
        ids.push(
            d.as_str()
                .ok_or_else(|| Error::bad_json("'devices' must be an array of strings"))?,
        );
    }
    for d in ids {
        remove_device(&s, &user, d)?;
    }
    Ok(Json(json!({})))
}

/// `GET /_synapse/admin/v1/whois/{userId}`: each device's last connection.
async fn whois(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    let raw = p.get(0)?;
    require_admin(&s, &who, "GET /_synapse/admin/v1/whois/{userId}", Some(raw))?;
    let user = local_user(&s, raw)?;
    known_user(&s, &user)?;
    // Synapse's shape: every connection in one session under the device key "" (the client
    // API's `/admin/whois` keys them by device id, as the spec says).
    let mut connections = Vec::new();
    for d in s.accounts.devices(&user)? {
        if let Some(ts) = d.last_seen_ts {
            connections.push(json!({
                "ip": d.last_seen_ip,
                "last_seen": ts,
                "user_agent": d.last_seen_user_agent,
            }));
        }
    }
    Ok(Json(json!({
        "user_id": user,
        "devices": { "": { "sessions": [{ "connections": connections }] } },
    })))
}

// Registration tokens (Synapse's shapes).

fn token_json(t: &RegistrationToken) -> Value {
    json!({
        "token": t.token,
        "uses_allowed": t.uses_allowed,
        "pending": t.pending,
        "completed": t.completed,
        "expiry_time": t.expiry_time,
    })
}

/// `pending` counts the uses registrations in progress hold (a UIA session that passed the
/// token stage, until it registers or expires); `completed` the accounts made with the token.
fn token_valid(t: &RegistrationToken) -> bool {
    t.expiry_time.is_none_or(|e| e > utils::now_ms())
        && t.uses_allowed
            .is_none_or(|n| t.pending.saturating_add(t.completed) < n)
}

/// `GET /_synapse/admin/v1/registration_tokens[?valid=true|false]`.
async fn list_tokens(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    require_admin(&s, &who, "GET /_synapse/admin/v1/registration_tokens", None)?;
    let valid = match query_param(&q, "valid")?.as_deref() {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return Err(Error::invalid_param("valid must be true or false")),
    };
    let tokens: Vec<Value> = s
        .accounts
        .registration_tokens()?
        .iter()
        .filter(|t| valid.is_none_or(|v| token_valid(t) == v))
        .map(token_json)
        .collect();
    Ok(Json(json!({ "registration_tokens": tokens })))
}

/// `uses_allowed`: absent or null (unlimited), or a non-negative integer.
fn uses_allowed(body: &Map<String, Value>) -> Result<Option<u32>> {
    match body.get("uses_allowed") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                Error::invalid_param("uses_allowed must be a non-negative integer or null")
            }),
    }
}

/// `expiry_time`: absent or null (never), or a time in ms that is not in the past.
fn expiry_time(body: &Map<String, Value>) -> Result<Option<u64>> {
    match body.get("expiry_time") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(t) if t >= utils::now_ms() => Ok(Some(t)),
            Some(_) => Err(Error::invalid_param("expiry_time must not be in the past")),
            None => Err(Error::invalid_param(
                "expiry_time must be an integer (ms) or null",
            )),
        },
    }
}

/// `POST /_synapse/admin/v1/registration_tokens/new` with optional `token`, `uses_allowed`,
/// `expiry_time` and `length` (of a generated token, 1-64, default 16).
async fn new_token(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    require_admin(
        &s,
        &who,
        "POST /_synapse/admin/v1/registration_tokens/new",
        None,
    )?;
    let uses = uses_allowed(&body)?;
    let expiry = expiry_time(&body)?;
    let token = match body.get("token") {
        None | Some(Value::Null) => {
            let length = match body.get("length") {
                None | Some(Value::Null) => 16,
                Some(v) => match v.as_u64() {
                    Some(n @ 1..=64) => n as usize,
                    _ => {
                        return Err(Error::invalid_param(
                            "length must be an integer between 1 and 64",
                        ))
                    }
                },
            };
            utils::random_string(length)
        }
        Some(Value::String(t)) => {
            if body.get("length").is_some_and(|l| !l.is_null()) {
                return Err(Error::invalid_param("Give either token or length"));
            }
            t.clone()
        }
        Some(_) => return Err(Error::invalid_param("token must be a string")),
    };
    if s.accounts.registration_token(&token)?.is_some() {
        return Err(Error::invalid_param("Token already exists"));
    }
    let rec = s
        .accounts
        .create_registration_token(Some(token), uses, expiry)?;
    Ok(Json(token_json(&rec)))
}

fn token_param(p: &Segs) -> Result<&str> {
    let t = p.get(0)?;
    if t.len() > 64 {
        return Err(Error::not_found("No such registration token"));
    }
    Ok(t)
}

/// `GET /_synapse/admin/v1/registration_tokens/{token}`.
async fn get_token(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
) -> Result<Json<Value>> {
    // The token is a secret: the audit entry names the endpoint only.
    require_admin(
        &s,
        &who,
        "GET /_synapse/admin/v1/registration_tokens/{token}",
        None,
    )?;
    let rec = s
        .accounts
        .registration_token(token_param(&p)?)?
        .ok_or_else(|| Error::not_found("No such registration token"))?;
    Ok(Json(token_json(&rec)))
}

/// `PUT /_synapse/admin/v1/registration_tokens/{token}` with `uses_allowed` and/or
/// `expiry_time` (null removes the limit).
async fn update_token(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    require_admin(
        &s,
        &who,
        "PUT /_synapse/admin/v1/registration_tokens/{token}",
        None,
    )?;
    let uses = if body.contains_key("uses_allowed") {
        Some(uses_allowed(&body)?)
    } else {
        None
    };
    let expiry = if body.contains_key("expiry_time") {
        Some(expiry_time(&body)?)
    } else {
        None
    };
    let rec = s
        .accounts
        .update_registration_token(token_param(&p)?, uses, expiry)?
        .ok_or_else(|| Error::not_found("No such registration token"))?;
    Ok(Json(token_json(&rec)))
}

/// `DELETE /_synapse/admin/v1/registration_tokens/{token}`.
async fn delete_token(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
) -> Result<Response> {
    require_admin(
        &s,
        &who,
        "DELETE /_synapse/admin/v1/registration_tokens/{token}",
        None,
    )?;
    if !s.accounts.delete_registration_token(token_param(&p)?)? {
        return Err(Error::not_found("No such registration token"));
    }
    Ok((StatusCode::OK, Json(json!({}))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_escaping() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("line\nbreak"), "\"line\nbreak\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("-1,2"), "\"'-1,2\"");
        assert_eq!(csv_field("@alice:example.org"), "@alice:example.org");
        assert_eq!(csv_field("@SUM(1+1)"), "'@SUM(1+1)");
    }

    #[test]
    fn since_tokens() {
        let k = crate::policy::audit::entry_key(1234, 5);
        assert_eq!(unhex(&hex(&k)), Some(k));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
    }
}
