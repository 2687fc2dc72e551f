//! SSO (C-S spec "Client login via SSO"): `GET /login/sso/redirect[/{idpId}]?redirectUrl=` sends
//! the browser to the identity provider; `GET /_hafen/client/v1/sso/callback` is where it comes
//! back; `GET /auth/m.login.sso/fallback/web?session=` is the user-interactive authentication
//! stage `m.login.sso` (a fresh login at the provider). They answer browsers: failures at the
//! callback are small HTML pages.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{RawQuery, State},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use http::{header, HeaderMap, HeaderValue, StatusCode};

use super::account::{both, query_param, ClientIp, Segs};
use crate::{
    error::{ErrCode, Error, Result},
    service::{
        sso::{html_escape, Completed, Purpose, Sso, CALLBACK_PATH, COOKIE},
        Services,
    },
};

/// Most query parameters read at the callback.
const MAX_QUERY_PAIRS: usize = 32;

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = both(r, "/login/sso/redirect", get(redirect_any));
    let r = both(r, "/login/sso/redirect/{idp_id}", get(redirect_idp));
    let r = both(r, "/auth/{auth_type}/fallback/web", get(auth_fallback));
    r.route(CALLBACK_PATH, get(callback))
}

/// The client's `redirectUrl`, checked.
fn redirect_url(sso: &Sso, q: &Option<String>) -> Result<String> {
    let url = query_param(q, "redirectUrl")?
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing redirectUrl"))?;
    if !sso.valid_redirect_url(&url) {
        return Err(Error::invalid_param("redirectUrl must be an http(s) URL"));
    }
    Ok(url)
}

fn not_configured() -> Error {
    Error::with_status(
        ErrCode::Unrecognized,
        StatusCode::NOT_FOUND,
        "SSO is not configured on this server",
    )
}

fn html(status: StatusCode, body: String) -> Response {
    let mut res = (status, body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{t}</title></head><body><h1>{t}</h1>{body}</body></html>",
        t = html_escape(title)
    )
}

/// Without an idpId: the one provider, or a page to choose among several.
async fn redirect_any(
    State(s): State<Arc<Services>>,
    ClientIp(ip): ClientIp,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    if !s.sso.enabled() {
        return Err(not_configured());
    }
    limit(&s, ip)?;
    let url = redirect_url(&s.sso, &q)?;
    if s.sso.providers.len() == 1 {
        return start(&s, 0, Purpose::Login { redirect_url: url }).await;
    }
    let mut links = String::from("<ul>");
    for p in &s.sso.providers {
        let href = format!(
            "/_matrix/client/v3/login/sso/redirect/{}?redirectUrl={}",
            p.conf.idp_id,
            url::form_urlencoded::byte_serialize(url.as_bytes()).collect::<String>()
        );
        links.push_str(&format!(
            "<li><a href=\"{}\">{}</a></li>",
            html_escape(&href),
            html_escape(&p.conf.idp_name)
        ));
    }
    links.push_str("</ul>");
    Ok(html(StatusCode::OK, page("Choose how to log in", &links)))
}

async fn redirect_idp(
    State(s): State<Arc<Services>>,
    ClientIp(ip): ClientIp,
    Segs(segs): Segs,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    if !s.sso.enabled() {
        return Err(not_configured());
    }
    limit(&s, ip)?;
    let idp = segs
        .first()
        .and_then(|id| s.sso.provider(id))
        .ok_or_else(|| Error::not_found("Unknown identity provider"))?;
    let url = redirect_url(&s.sso, &q)?;
    start(&s, idp, Purpose::Login { redirect_url: url }).await
}

/// The fallback page of user-interactive authentication (C-S spec "Fallback"): only the
/// `m.login.sso` stage has one; it sends the browser to the user's provider.
async fn auth_fallback(
    State(s): State<Arc<Services>>,
    ClientIp(ip): ClientIp,
    Segs(segs): Segs,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    if segs.first().map(String::as_str) != Some("m.login.sso") {
        return Err(Error::with_status(
            ErrCode::Unrecognized,
            StatusCode::NOT_FOUND,
            "This authentication stage has no fallback",
        ));
    }
    let session = query_param(&q, "session")?
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing session"))?;
    let user = s
        .uiaa
        .get(&session)
        .and_then(|u| u.user)
        .and_then(|u| ruma::UserId::parse(u).ok());
    let Some(user) = user else {
        return Ok(html(
            StatusCode::BAD_REQUEST,
            page(
                "Authentication failed",
                "<p>M_UNKNOWN: unknown or expired session</p>",
            ),
        ));
    };
    let Some(idp) = s.sso.reauth_provider(&s, &user) else {
        return Ok(html(
            StatusCode::BAD_REQUEST,
            page(
                "Authentication failed",
                "<p>M_UNKNOWN: your account has no SSO login</p>",
            ),
        ));
    };
    // The link may come from someone else who holds a session: say what is being confirmed
    // and go on only when the user asks to.
    if query_param(&q, "confirm")?.as_deref() != Some("1") {
        let href = format!(
            "/_matrix/client/v3/auth/m.login.sso/fallback/web?session={}&confirm=1",
            url::form_urlencoded::byte_serialize(session.as_bytes()).collect::<String>()
        );
        return Ok(html(
            StatusCode::OK,
            page(
                "Confirm a sensitive action",
                &format!(
                    "<p>A Matrix client asks you, {}, to confirm a sensitive action on your account \
                     (such as signing out devices, resetting your encryption keys or deactivating the account) \
                     by logging in at {} again.</p><p>Continue only if you started this action yourself.</p>\
                     <p><a href=\"{}\">Continue to {}</a></p>",
                    html_escape(user.as_str()),
                    html_escape(&s.sso.providers[idp].conf.idp_name),
                    html_escape(&href),
                    html_escape(&s.sso.providers[idp].conf.idp_name),
                ),
            ),
        ));
    }
    limit(&s, ip)?;
    start(&s, idp, Purpose::Reauth { session, user }).await
}

/// Starting a login costs a pending entry (bounded in number): limited per address like logins.
fn limit(s: &Services, ip: Option<std::net::IpAddr>) -> Result<()> {
    match ip {
        Some(ip) => s
            .ratelimit
            .check(crate::service::ratelimit::Action::Login, &ip.to_string()),
        None => Ok(()),
    }
}

async fn start(s: &Services, idp: usize, purpose: Purpose) -> Result<Response> {
    let (location, session) = s.sso.start(idp, purpose).await?;
    let mut res = StatusCode::FOUND.into_response();
    let h = res.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(&location).map_err(Error::internal)?,
    );
    h.insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&s.sso.cookie(Some(&session))).map_err(Error::internal)?,
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

/// The pending-login cookie of the request.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

async fn callback(
    State(s): State<Arc<Services>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let pairs: Vec<(String, String)> = q
        .as_deref()
        .and_then(|q| serde_html_form::from_str(q).ok())
        .unwrap_or_default();
    let mut query = HashMap::new();
    for (k, v) in pairs.into_iter().take(MAX_QUERY_PAIRS) {
        query.entry(k).or_insert(v);
    }
    let session = session_cookie(&headers);
    let outcome = s.sso.callback(&s, session.as_deref(), &query).await;
    let mut res = match outcome {
        Err(f) => html(
            f.status,
            page(
                "Login failed",
                &format!(
                    "<p>{}: {}</p>",
                    html_escape(f.errcode),
                    html_escape(&f.message)
                ),
            ),
        ),
        Ok(Completed::Reauth) => html(
            StatusCode::OK,
            // The spec's fallback ending: tell the client (embedded or a popup) it may go on.
            page(
                "Authentication complete",
                "<script>if (window.onAuthDone) { window.onAuthDone(); } else if (window.opener && window.opener.postMessage) { window.opener.postMessage(\"authDone\", \"*\"); }</script><p>Thank you. You may now close this window and return to the application.</p>",
            ),
        ),
        Ok(Completed::Login { location, confirm: false }) => {
            let mut res = StatusCode::FOUND.into_response();
            match HeaderValue::from_str(&location) {
                Ok(v) => {
                    res.headers_mut().insert(header::LOCATION, v);
                }
                Err(_) => return html(StatusCode::BAD_REQUEST, page("Login failed", "<p>M_UNKNOWN: invalid redirectUrl</p>")),
            }
            res
        }
        Ok(Completed::Login { location, .. }) => {
            // A client not on the allowlist: the user decides whether it gets their login, so a
            // link sent by someone else cannot take over the account unnoticed.
            let host = url::Url::parse(&location)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_default();
            html(
                StatusCode::OK,
                page(
                    "Continue to your client?",
                    &format!(
                        "<p>You are logging in to <b>{}</b>. Continue only if you started this login there.</p><p><a href=\"{}\">Continue to {}</a></p>",
                        html_escape(&host),
                        html_escape(&location),
                        html_escape(&host)
                    ),
                ),
            )
        }
    };
    if let Ok(v) = HeaderValue::from_str(&s.sso.cookie(None)) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}
