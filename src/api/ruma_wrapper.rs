//! `Ruma<T>`: the axum extractor that turns an HTTP request into ruma's typed request `T`,
//! after authenticating it as `T`'s metadata demands. `RumaResponse<T>` goes the other way.
//! Every client endpoint goes through here, so size limits, JSON checks and token checks are
//! in one place.

use std::{net::IpAddr, sync::Arc};

use axum::{
    extract::{FromRequest, Path, Request},
    response::{IntoResponse, Response},
    RequestPartsExt,
};
use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body_util::BodyExt;
use ruma::api::{
    auth_scheme::{
        AccessToken, AccessTokenOptional, AppserviceToken, AppserviceTokenOptional, NoAccessToken,
        NoAuthentication,
    },
    error::{DeserializationError, FromHttpRequestError},
    IncomingRequest, Metadata, OutgoingResponse,
};

use crate::{
    error::{ErrCode, Error, Result},
    service::{accounts::Identity, Services},
};

/// How an endpoint authenticates, derived from ruma's metadata.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AuthKind {
    None,
    Optional,
    Required,
}

pub trait AuthRequirement {
    const KIND: AuthKind;
}
impl AuthRequirement for NoAuthentication {
    const KIND: AuthKind = AuthKind::None;
}
impl AuthRequirement for NoAccessToken {
    const KIND: AuthKind = AuthKind::None;
}
impl AuthRequirement for AccessToken {
    const KIND: AuthKind = AuthKind::Required;
}
impl AuthRequirement for AccessTokenOptional {
    const KIND: AuthKind = AuthKind::Optional;
}
impl AuthRequirement for AppserviceToken {
    const KIND: AuthKind = AuthKind::Required;
}
impl AuthRequirement for AppserviceTokenOptional {
    const KIND: AuthKind = AuthKind::Optional;
}

/// A parsed, authenticated request.
pub struct Ruma<T> {
    pub body: T,
    /// Who sent it (when the endpoint takes a token and one was given).
    pub identity: Option<Identity>,
    /// The client's address, for rate limits and the audit log.
    pub ip: Option<IpAddr>,
    /// The request body as JSON, for handlers that need fields ruma does not model.
    pub json: Option<serde_json::Value>,
}

impl<T> Ruma<T> {
    /// The identity of an endpoint that requires a token (the extractor guarantees it).
    pub fn user(&self) -> Result<&Identity> {
        self.identity
            .as_ref()
            .ok_or(Error::new(ErrCode::MissingToken, "Missing access token"))
    }
}

impl<T> std::ops::Deref for Ruma<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.body
    }
}

/// The access token from `Authorization: Bearer` or the deprecated `access_token` query parameter.
pub fn access_token(parts: &http::request::Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        return value.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
    }
    let query = parts.uri.query()?;
    serde_html_form::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v)
}

impl<T> FromRequest<Arc<Services>> for Ruma<T>
where
    T: IncomingRequest + Send,
    T::Authentication: AuthRequirement,
{
    type Rejection = Error;

    async fn from_request(req: Request, services: &Arc<Services>) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let ip = super::client_addr(&parts.extensions);
        let path_args: Vec<String> = match parts.extract::<Path<Vec<String>>>().await {
            Ok(Path(args)) => args,
            Err(_) => Vec::new(),
        };

        let identity = match <T::Authentication as AuthRequirement>::KIND {
            AuthKind::None => None,
            kind => match access_token(&parts) {
                Some(token) => Some(identify(services, &parts, &token)?),
                None if kind == AuthKind::Required => {
                    return Err(Error::new(ErrCode::MissingToken, "Missing access token"))
                }
                None => None,
            },
        };

        let limit = services.config.max_request_size;
        let bytes = read_body_limited(body, limit).await?;
        let (body_bytes, json) = if bytes.is_empty() {
            let empty = if T::METHOD == http::Method::GET
                || T::METHOD == http::Method::DELETE && bytes.is_empty()
            {
                Bytes::new()
            } else {
                Bytes::from_static(b"{}")
            };
            (empty, None)
        } else {
            match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(v) => (bytes, Some(v)),
                Err(_) if is_json_endpoint(&parts) => {
                    return Err(Error::new(
                        ErrCode::NotJson,
                        "Request body is not valid JSON",
                    ))
                }
                Err(_) => (bytes, None),
            }
        };

        let request = http::Request::from_parts(parts, body_bytes);
        let body = T::try_from_http_request(request, &path_args).map_err(map_parse_error)?;
        Ok(Ruma {
            body,
            identity,
            ip,
            json,
        })
    }
}

/// Client endpoints take JSON bodies, except uploads (media, which come with their own type).
fn is_json_endpoint(parts: &http::request::Parts) -> bool {
    !parts.uri.path().contains("/media/")
}

pub(crate) async fn read_body_limited(body: axum::body::Body, limit: usize) -> Result<Bytes> {
    let limited = http_body_util::Limited::new(body, limit);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Error::new(
            ErrCode::TooLarge,
            format!("Request body is larger than {limit} bytes"),
        )),
        Err(e) => Err(Error::bad_json(format!("cannot read request body: {e}"))),
    }
}

fn map_parse_error(e: FromHttpRequestError) -> Error {
    match e {
        FromHttpRequestError::Deserialization(DeserializationError::Json(e)) => {
            Error::bad_json(format!("Invalid request: {e}"))
        }
        FromHttpRequestError::Deserialization(DeserializationError::Query(e)) => {
            Error::invalid_param(format!("Invalid query parameter: {e}"))
        }
        FromHttpRequestError::Deserialization(DeserializationError::Ident(e)) => {
            Error::invalid_param(format!("Invalid identifier: {e}"))
        }
        FromHttpRequestError::Deserialization(e) => {
            Error::bad_json(format!("Invalid request: {e}"))
        }
        FromHttpRequestError::MethodMismatch { .. } => Error::with_status(
            ErrCode::Unrecognized,
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
        ),
        _ => Error::bad_json("Invalid request"),
    }
}

/// A ruma response, serialized as the spec says.
pub struct RumaResponse<T>(pub T);

impl<T> From<T> for RumaResponse<T> {
    fn from(t: T) -> Self {
        RumaResponse(t)
    }
}

impl<T: OutgoingResponse> IntoResponse for RumaResponse<T> {
    fn into_response(self) -> Response {
        match self.0.try_into_http_response::<BytesMut>() {
            Ok(res) => {
                let (mut parts, body) = res.into_parts();
                parts.headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                Response::from_parts(parts, axum::body::Body::from(body.freeze()))
            }
            Err(e) => Error::internal(format!("response serialization: {e}")).into_response(),
        }
    }
}

/// Register a handler on every path (stable and unstable) that ruma knows for request `Req`.
pub fn ruma_route<Req, H, X>(
    router: axum::Router<Arc<Services>>,
    handler: H,
) -> axum::Router<Arc<Services>>
where
    Req: Metadata,
    H: axum::handler::Handler<X, Arc<Services>>,
    X: 'static,
{
    use ruma::api::path_builder::PathBuilder;
    let filter = match Req::METHOD {
        http::Method::GET => axum::routing::MethodFilter::GET,
        http::Method::POST => axum::routing::MethodFilter::POST,
        http::Method::PUT => axum::routing::MethodFilter::PUT,
        http::Method::DELETE => axum::routing::MethodFilter::DELETE,
        _ => axum::routing::MethodFilter::GET,
    };
    let mut router = router;
    let mut seen = std::collections::HashSet::new();
    for path in Req::PATH_BUILDER.all_paths() {
        if seen.insert(path) {
            router = router.route(path, axum::routing::on(filter, handler.clone()));
        }
    }
    router
}

/// The identity behind an access token. A locked account gets `M_USER_LOCKED` everywhere except
/// on the logout endpoints.
fn identify(services: &Services, parts: &http::request::Parts, token: &str) -> Result<Identity> {
    let identity = match services.appservices.by_token(token) {
        // Appservice users cannot click through a privacy notice: the operator who registered
        // the bridge answers for it (as in Synapse, they are exempt from consent).
        Some(appservice) => appservice_identity(services, parts, appservice)?,
        None => {
            let mut identity = services.accounts.identify(token)?;
            identity.consent_uri = crate::policy::consent::pending_uri(
                services,
                &identity.user_id,
                identity.accepted_notice.as_deref(),
            );
            identity
        }
    };
    if identity.locked {
        let path = parts.uri.path();
        if !(path.ends_with("/logout") || path.ends_with("/logout/all")) {
            return Err(Error::UserLocked);
        }
    }
    // The device's connection: kept in memory, written only when it changes (audit log).
    let ip = super::client_addr(&parts.extensions);
    let user_agent = parts
        .headers
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok());
    // A bridge acting as its many users is one connection: recorded for its sender only, not
    // once per user it acts as.
    let puppet = identity
        .appservice
        .as_ref()
        .is_some_and(|a| a.sender != identity.user_id);
    if !puppet {
        services.accounts.note_connection(&identity, ip, user_agent);
    }
    // Client version policy; a blocked client may still log out.
    let path = parts.uri.path();
    if !(path.ends_with("/logout") || path.ends_with("/logout/all")) {
        crate::policy::access::check_client(
            services,
            &identity.user_id,
            &identity.device_id,
            user_agent,
        )?;
    }
    Ok(identity)
}

/// The device an appservice user acts from when the appservice names none: appservice users
/// need no device of their own (their `as_token` is their access token).
pub const APPSERVICE_DEVICE: &str = "APPSERVICE";

/// Who an appservice acts as: its sender, or the user `?user_id=` asserts, which must be in its
/// user namespace (else 403 `M_FORBIDDEN`) and registered (else 403 `M_FORBIDDEN`). A device of
/// that user may be named with `device_id` (MSC4190; `org.matrix.msc3202.device_id`); it must
/// exist (else 400 `M_INVALID_PARAM`).
fn appservice_identity(
    services: &Services,
    parts: &http::request::Parts,
    appservice: Arc<crate::service::appservice::Appservice>,
) -> Result<Identity> {
    let pairs: Vec<(String, String)> = match parts.uri.query() {
        Some(q) => serde_html_form::from_str(q)
            .map_err(|_| Error::invalid_param("Invalid query string"))?,
        None => Vec::new(),
    };
    let param = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let user_id = match param("user_id") {
        Some(u) => ruma::UserId::parse(u).map_err(|_| Error::invalid_param("Invalid user_id"))?,
        None => appservice.sender.clone(),
    };
    if !appservice.owns_user(&user_id) {
        return Err(Error::forbidden(
            "The application service may not act as this user (outside its namespace)",
        ));
    }
    let record = services
        .accounts
        .user(&user_id)?
        .filter(|u| !u.deactivated)
        .ok_or_else(|| Error::forbidden("The application service has not registered this user"))?;
    // A request from the appservice says it is up: a transaction waiting for a retry goes now.
    services
        .appservices
        .queue
        .appservice_is_back(appservice.id());
    let device_id: ruma::OwnedDeviceId =
        match param("device_id").or(param("org.matrix.msc3202.device_id")) {
            Some(d) => {
                let d: ruma::OwnedDeviceId = d.into();
                if services.accounts.device(&user_id, &d)?.is_none() {
                    return Err(Error::invalid_param("The user has no such device"));
                }
                d
            }
            None => APPSERVICE_DEVICE.into(),
        };
    Ok(Identity {
        user_id,
        device_id,
        admin: record.admin,
        guest: false,
        locked: record.locked,
        suspended: record.suspended,
        accepted_notice: record.privacy_notice_accepted.map(|(version, _)| version),
        consent_uri: None,
        appservice: Some(appservice),
    })
}

/// For handlers that do not use a ruma request type and serve guests of the server too: the
/// identity when a token is sent (an invalid token is still an error), None without one.
pub struct MaybeAuthed(pub Option<Identity>);

impl axum::extract::FromRequestParts<Arc<Services>> for MaybeAuthed {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        services: &Arc<Services>,
    ) -> Result<Self, Self::Rejection> {
        match access_token(parts) {
            Some(token) => Ok(MaybeAuthed(Some(identify(services, parts, &token)?))),
            None => Ok(MaybeAuthed(None)),
        }
    }
}

/// For handlers that do not use a ruma request type: the authenticated identity (token required).
pub struct Authed(pub Identity);

impl axum::extract::FromRequestParts<Arc<Services>> for Authed {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        services: &Arc<Services>,
    ) -> Result<Self, Self::Rejection> {
        match MaybeAuthed::from_request_parts(parts, services).await? {
            MaybeAuthed(Some(identity)) => Ok(Authed(identity)),
            MaybeAuthed(None) => Err(Error::new(ErrCode::MissingToken, "Missing access token")),
        }
    }
}

/// For handlers that do not use a ruma request type: the body as a JSON object, with the spec's
/// errors for a body that is not JSON (`M_NOT_JSON`) or not an object (`M_BAD_JSON`), and the
/// size limit (`M_TOO_LARGE`).
pub struct JsonBody(pub serde_json::Map<String, serde_json::Value>);

impl FromRequest<Arc<Services>> for JsonBody {
    type Rejection = Error;

    async fn from_request(req: Request, services: &Arc<Services>) -> Result<Self, Self::Rejection> {
        let bytes = read_body_limited(req.into_body(), services.config.max_request_size).await?;
        if bytes.is_empty() {
            return Ok(JsonBody(serde_json::Map::new()));
        }
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(serde_json::Value::Object(o)) => Ok(JsonBody(o)),
            Ok(_) => Err(Error::bad_json("Request body must be a JSON object")),
            Err(_) => Err(Error::new(
                ErrCode::NotJson,
                "Request body is not valid JSON",
            )),
        }
    }
}

/// The access token as sent, unchecked: for the endpoints where an appservice identifies itself
/// by its `as_token` before any user exists (`/register` and `/login` with
/// `m.login.application_service`).
pub struct RawToken(pub Option<String>);

impl axum::extract::FromRequestParts<Arc<Services>> for RawToken {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _: &Arc<Services>,
    ) -> Result<Self, Self::Rejection> {
        Ok(RawToken(access_token(parts)))
    }
}

impl RawToken {
    /// The appservice whose `as_token` this is: 401 `M_MISSING_TOKEN` without a token,
    /// 401 `M_UNKNOWN_TOKEN` when it is no appservice's.
    pub fn appservice(
        &self,
        services: &Services,
    ) -> Result<Arc<crate::service::appservice::Appservice>> {
        let token = self
            .0
            .as_deref()
            .ok_or_else(|| Error::new(ErrCode::MissingToken, "Missing access token"))?;
        services
            .appservices
            .by_token(token)
            .ok_or(Error::UnknownToken { soft_logout: false })
    }
}
