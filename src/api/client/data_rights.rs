//! The data subject's rights and transparency: export of a user's data (self-service and
//! admin), Synapse's admin deactivate-with-erase, the privacy notice, and the compliance report.
//!
//! - `GET /_hafen/client/v1/export`: the caller's own data as a tar archive (access token; see
//!   docs/compliance.md for why no re-authentication);
//! - `GET /_hafen/admin/v1/users/{userId}/export`: the same for any local user (server admins);
//! - `POST /_synapse/admin/v1/deactivate/{userId}` with `{"erase": true}` (server admins);
//! - `GET /_hafen/client/v1/privacy_notice`: the configured notice (no token: it must be
//!   readable before registering);
//! - `GET /_hafen/client/v1/privacy` (JSON) and `GET /_hafen/privacy` (a web page): what is
//!   stored, why, for how long and who receives it, from the live config (no token);
//! - `GET /_hafen/admin/v1/compliance_report`: `hafen audit` as JSON (server admins).

use std::sync::Arc;

use axum::{
    body::Body,
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde_json::{json, Value};

use super::account::{opt_bool, Segs};
use crate::{
    api::ruma_wrapper::Authed,
    error::{Error, Result},
    policy::audit::AuditEntry,
    service::{accounts::Identity, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route("/_hafen/client/v1/export", get(export_own))
        .route("/_hafen/admin/v1/users/{user_id}/export", get(export_admin))
        .route(
            "/_synapse/admin/v1/deactivate/{user_id}",
            post(admin_deactivate),
        )
        .route("/_hafen/client/v1/privacy_notice", get(privacy_notice))
        .route("/_hafen/client/v1/privacy", get(privacy_statement))
        .route("/_hafen/privacy", get(privacy_page))
        .route("/_hafen/admin/v1/compliance_report", get(compliance_report))
}

fn archive_response(s: Arc<Services>, user: ruma::OwnedUserId) -> Response {
    let filename = format!(
        "hafen-export-{}.tar",
        user.localpart()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-' || *c == '.')
            .collect::<String>()
    );
    let rx = crate::policy::export::archive(s, user);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/x-tar".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

fn audit_export(s: &Services, who: &Identity, subject: &ruma::UserId) -> Result<()> {
    s.audit.record(AuditEntry {
        kind: "export".to_owned(),
        user: Some(subject.to_string()),
        device: Some(who.device_id.to_string()),
        detail: json!({ "by": who.user_id }),
        ..AuditEntry::default()
    })
}

async fn export_own(State(s): State<Arc<Services>>, Authed(who): Authed) -> Result<Response> {
    if who.guest {
        return Err(Error::forbidden("Guests cannot export data"));
    }
    audit_export(&s, &who, &who.user_id)?;
    Ok(archive_response(s.clone(), who.user_id.clone()))
}

/// The target of an admin action on a user: the caller must be a server admin (checked first),
/// the target a local user that exists.
fn admin_target(s: &Services, who: &Identity, raw: &str) -> Result<ruma::OwnedUserId> {
    if !who.admin {
        return Err(Error::forbidden("Only server admins may do this"));
    }
    let user = super::user_id(raw)?;
    if user.server_name() != s.globals.server_name {
        return Err(Error::invalid_param("The user is not local to this server"));
    }
    if s.accounts.user(&user)?.is_none() {
        return Err(Error::not_found("Unknown user"));
    }
    Ok(user)
}

async fn export_admin(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
) -> Result<Response> {
    let user = admin_target(&s, &who, p.get(0)?)?;
    audit_export(&s, &who, &user)?;
    Ok(archive_response(s.clone(), user))
}

/// Synapse's `POST /_synapse/admin/v1/deactivate/{userId}`: body `{"erase": bool}`, answer
/// `{"id_server_unbind_result": ...}`.
async fn admin_deactivate(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    body: axum::body::Bytes,
) -> Result<Json<Value>> {
    let user = admin_target(&s, &who, p.get(0)?)?;
    // Synapse accepts an empty body (no erasure).
    let erase = if body.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(b)) => opt_bool(&b, "erase")?.unwrap_or(false),
            _ => return Err(Error::bad_json("The body must be a JSON object")),
        }
    };
    s.audit.record(AuditEntry {
        kind: "admin_action".to_owned(),
        user: Some(who.user_id.to_string()),
        device: Some(who.device_id.to_string()),
        // An erased user is named by their pseudonym only, here too.
        detail: json!({
            "action": "deactivate",
            "erase": erase,
            "target": if erase {
                crate::policy::erasure::pseudonym(&s, &user)
            } else {
                user.to_string()
            },
        }),
        ..AuditEntry::default()
    })?;
    crate::policy::erasure::deactivate(&s, &user, erase).await?;
    Ok(Json(json!({ "id_server_unbind_result": "success" })))
}

async fn privacy_notice(State(s): State<Arc<Services>>) -> Result<Json<Value>> {
    let p = s
        .config
        .privacy_notice
        .as_ref()
        .ok_or_else(|| Error::not_found("No privacy notice is configured"))?;
    Ok(Json(json!({
        "name": p.name.as_deref().unwrap_or("Privacy notice"),
        "url": p.url,
        "version": p.version,
        "policies": crate::service::accounts::terms_params(&s)["m.login.terms"]["policies"].clone(),
    })))
}

/// The registered appservices, by id: recipients the privacy statement names.
fn appservice_ids(s: &Services) -> Vec<String> {
    s.appservices
        .all()
        .iter()
        .map(|a| a.id().to_owned())
        .collect()
}

async fn privacy_statement(State(s): State<Arc<Services>>) -> Result<Json<Value>> {
    Ok(Json(serde_json::to_value(
        crate::policy::transparency::statement(&s.config).with_appservices(&appservice_ids(&s)),
    )?))
}

async fn privacy_page(State(s): State<Arc<Services>>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        crate::policy::transparency::statement(&s.config)
            .with_appservices(&appservice_ids(&s))
            .to_html(),
    )
        .into_response()
}

async fn compliance_report(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
) -> Result<Json<Value>> {
    if !who.admin {
        return Err(Error::forbidden(
            "Only server admins may read the compliance report",
        ));
    }
    let report = crate::policy::report::compliance_report(&s.config, Some(&s.storage))?;
    Ok(Json(serde_json::to_value(report)?))
}
