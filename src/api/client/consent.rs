//! Accepting a new version of the privacy notice after registration (`policy::consent`):
//!
//! - `POST /_hafen/client/v1/privacy_notice/accept` `{"version"}` with the user's token;
//! - `GET /_hafen/consent?u=&h=`: the page a `consent_uri` opens (no token: the link is signed
//!   for the user), with the notice and an "I accept" button;
//! - `POST /_hafen/consent` (that form): records the acceptance.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use ruma::UserId;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    api::ruma_wrapper::{Authed, JsonBody},
    error::{Error, Result},
    policy::{consent, transparency::escape},
    service::Services,
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route(
        "/_hafen/client/v1/privacy_notice/accept",
        post(accept_with_token),
    )
    .route("/_hafen/consent", get(consent_page).post(consent_form))
}

async fn accept_with_token(
    State(s): State<Arc<Services>>,
    Authed(me): Authed,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>> {
    let version = body
        .get("version")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::bad_json("`version` (a string) is required"))?;
    consent::accept(&s, &me.user_id, version)?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct Link {
    #[serde(default)]
    u: String,
    #[serde(default)]
    h: String,
    /// The version shown on the page (only in the form): a notice changed between showing
    /// and accepting is not accepted.
    #[serde(default)]
    v: String,
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        format!(
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{0}</title></head><body><h1>{0}</h1>{1}</body></html>",
            escape(title),
            body
        ),
    )
        .into_response()
}

/// The local, active user a valid link names.
fn linked_user(s: &Services, link: &Link) -> Option<ruma::OwnedUserId> {
    let user = UserId::parse(link.u.as_str()).ok()?;
    if user.server_name() != s.config.server_name || !consent::link_is_valid(s, &link.u, &link.h) {
        return None;
    }
    match s.accounts.user(&user) {
        Ok(Some(rec)) if !rec.deactivated => Some(user),
        _ => None,
    }
}

fn bad_link() -> Response {
    page(
        StatusCode::FORBIDDEN,
        "Invalid link",
        "<p>This link is not valid. Use the link your Matrix client showed you.</p>",
    )
}

async fn consent_page(State(s): State<Arc<Services>>, Query(link): Query<Link>) -> Response {
    let Some(notice) = &s.config.privacy_notice else {
        return page(
            StatusCode::NOT_FOUND,
            "No privacy notice",
            "<p>This server has no privacy notice.</p>",
        );
    };
    let Some(user) = linked_user(&s, &link) else {
        return bad_link();
    };
    let name = notice.name.as_deref().unwrap_or("Privacy notice");
    page(
        StatusCode::OK,
        name,
        &format!(
            "<p>{user}, please read the <a href=\"{url}\">{name}</a> (version {version}) of this server. \
             <a href=\"/_hafen/privacy\">What this server stores about you</a>.</p>\
             <form method=\"post\" action=\"/_hafen/consent\">\
             <input type=\"hidden\" name=\"u\" value=\"{u}\"><input type=\"hidden\" name=\"h\" value=\"{h}\">\
             <input type=\"hidden\" name=\"v\" value=\"{version}\">\
             <button type=\"submit\">I have read and accept the {name}</button></form>",
            user = escape(user.as_str()),
            url = escape(&notice.url),
            name = escape(name),
            version = escape(&notice.version),
            u = escape(&link.u),
            h = escape(&link.h),
        ),
    )
}

async fn consent_form(State(s): State<Arc<Services>>, body: Bytes) -> Response {
    let Ok(link) = serde_html_form::from_bytes::<Link>(&body) else {
        return page(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "<p>The form could not be read.</p>",
        );
    };
    let Some(user) = linked_user(&s, &link) else {
        return bad_link();
    };
    match consent::accept(&s, &user, &link.v) {
        Ok(()) => page(
            StatusCode::OK,
            "Thank you",
            "<p>Your acceptance was recorded. You can return to your Matrix client.</p>",
        ),
        Err(e) if e.errcode() == "M_INVALID_PARAM" => page(
            StatusCode::CONFLICT,
            "The notice has changed",
            "<p>The privacy notice changed while you were reading it. Open your link again to read the current version.</p>",
        ),
        Err(e) => e.into_response(),
    }
}
