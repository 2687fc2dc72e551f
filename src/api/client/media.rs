//! The content repository: upload (`/_matrix/media/v3/upload`, `/_matrix/media/v1/create`),
//! authenticated download, thumbnail, config and URL preview under `/_matrix/client/v1/media/`,
//! and the legacy unauthenticated `/_matrix/media/v3/` endpoints. Bodies are streamed, not
//! parsed by ruma: uploads straight to disk under their own size limit, downloads from disk.
//! The logic is in `service::media`.

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{FromRequestParts, RawQuery, State},
    response::{IntoResponse, Response},
    routing::{get, post, put},
    Json, Router,
};
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use ruma::http_headers::{ContentDisposition, ContentDispositionType};
use serde_json::{json, Value};

use super::account::{query_param, Segs};
use crate::{
    api::ruma_wrapper::Authed,
    error::{ErrCode, Error, Result},
    service::{
        media::{self, thumbnail::Method, FileInfo, UploadMeta},
        Services,
    },
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let v1 = "/_matrix/client/v1/media";
    let legacy = "/_matrix/media/v3";
    r.route(&format!("{legacy}/upload"), post(upload))
        .route(
            &format!("{legacy}/upload/{{server_name}}/{{media_id}}"),
            put(upload_to),
        )
        .route("/_matrix/media/v1/create", post(create))
        .route(&format!("{v1}/config"), get(config))
        .route(&format!("{legacy}/config"), get(config))
        .route(&format!("{v1}/preview_url"), get(preview_url))
        .route(&format!("{legacy}/preview_url"), get(preview_url))
        .route(
            &format!("{v1}/download/{{server_name}}/{{media_id}}"),
            get(download::<Authed>),
        )
        .route(
            &format!("{v1}/download/{{server_name}}/{{media_id}}/{{file_name}}"),
            get(download::<Authed>),
        )
        .route(
            &format!("{v1}/thumbnail/{{server_name}}/{{media_id}}"),
            get(thumbnail::<Authed>),
        )
        .route(
            &format!("{legacy}/download/{{server_name}}/{{media_id}}"),
            get(download::<Unfrozen>),
        )
        .route(
            &format!("{legacy}/download/{{server_name}}/{{media_id}}/{{file_name}}"),
            get(download::<Unfrozen>),
        )
        .route(
            &format!("{legacy}/thumbnail/{{server_name}}/{{media_id}}"),
            get(thumbnail::<Unfrozen>),
        )
}

/// Content types a browser may show inline (the spec's list for serving inline content); all
/// others are served as `attachment`.
const INLINE_TYPES: &[&str] = &[
    "text/css",
    "text/plain",
    "text/csv",
    "application/json",
    "application/ld+json",
    "image/jpeg",
    "image/gif",
    "image/png",
    "image/apng",
    "image/webp",
    "image/avif",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "audio/mp4",
    "audio/webm",
    "audio/aac",
    "audio/mpeg",
    "audio/ogg",
    "audio/wave",
    "audio/wav",
    "audio/x-wav",
    "audio/x-pn-wav",
    "audio/flac",
    "audio/x-flac",
];

/// What media responses carry so that a browser opening a media URL cannot run anything from it.
const CONTENT_SECURITY_POLICY: &str = "sandbox; default-src 'none'; script-src 'none'; \
     plugin-types application/pdf; style-src 'unsafe-inline'; object-src 'self';";

/// Whether `content_type` (parameters ignored) may be served inline.
pub fn is_inline(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    INLINE_TYPES.contains(&essence.as_str())
}

fn upload_meta(headers: &HeaderMap, q: &Option<String>) -> Result<UploadMeta> {
    Ok(UploadMeta {
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        filename: query_param(q, "filename")?,
        content_length: headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()),
    })
}

async fn upload(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>> {
    who.ensure_may_act()?;
    let meta = upload_meta(&headers, &q)?;
    let mxc = s
        .media
        .upload(&who.user_id, body.into_data_stream(), meta)
        .await?;
    Ok(Json(json!({ "content_uri": mxc })))
}

async fn upload_to(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    p: Segs,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>> {
    who.ensure_may_act()?;
    let meta = upload_meta(&headers, &q)?;
    s.media
        .upload_to(
            &who.user_id,
            p.get(0)?,
            p.get(1)?,
            body.into_data_stream(),
            meta,
        )
        .await?;
    Ok(Json(json!({})))
}

async fn create(State(s): State<Arc<Services>>, Authed(who): Authed) -> Result<Json<Value>> {
    who.ensure_may_act()?;
    let (mxc, expires_at) = s.media.create(&who.user_id).await?;
    Ok(Json(
        json!({ "content_uri": mxc, "unused_expires_at": expires_at }),
    ))
}

async fn config(State(s): State<Arc<Services>>, Authed(_who): Authed) -> Json<Value> {
    Json(json!({ "m.upload.size": s.media.max_upload_size() }))
}

async fn preview_url(
    State(s): State<Arc<Services>>,
    Authed(who): Authed,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let url = query_param(&q, "url")?
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "url is required"))?;
    Ok(Json(s.media.preview(&who.user_id, &url).await?))
}

/// `timeout_ms`, defaulting to the spec's 20 seconds.
pub(crate) fn timeout(q: &Option<String>) -> Result<Duration> {
    match query_param(q, "timeout_ms")? {
        None => Ok(media::DEFAULT_WAIT),
        Some(t) => t
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| Error::invalid_param("timeout_ms must be a non-negative integer")),
    }
}

/// `GET download` and `thumbnail`: `A` is [`Authed`] on the v1 endpoints and [`Unfrozen`] on
/// the legacy ones.
async fn download<A: Requester>(
    State(s): State<Arc<Services>>,
    access: A,
    p: Segs,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response> {
    fetch_if_remote(&s, &p, &access.requester()).await?;
    serve_download(&s, &p, &q, range_header(&headers)).await
}

async fn thumbnail<A: Requester>(
    State(s): State<Arc<Services>>,
    access: A,
    p: Segs,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response> {
    serve_thumbnail(&s, &p, &q, range_header(&headers), &access.requester()).await
}

/// Who asks for a download, for the bounds on fetching remote media: the user, or on the
/// unauthenticated legacy endpoints the client's address.
trait Requester {
    fn requester(&self) -> String;
}

impl Requester for Authed {
    fn requester(&self) -> String {
        self.0.user_id.to_string()
    }
}

impl Requester for Unfrozen {
    fn requester(&self) -> String {
        // By network, as rate limits key addresses: an IPv6 client holds a whole /64.
        match crate::policy::audit::RequestCtx::current().ip {
            Some(ip) => format!("ip:{}", crate::service::ratelimit::ip_key(ip)),
            None => "ip:unknown".to_owned(),
        }
    }
}

fn range_header(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// What a `Range` header asks of a file of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
enum RangeAsk {
    /// No range, or one this server ignores (several ranges, bad syntax): the whole file, 200.
    Whole,
    /// Bytes `start..=end`, 206.
    Part { start: u64, end: u64 },
    /// Nothing of the file: 416.
    Unsatisfiable,
}

/// Parse `bytes=a-b`, `bytes=a-` and `bytes=-n` (RFC 9110 section 14.1.2); anything else is
/// ignored, which the RFC allows.
fn parse_range(value: Option<&str>, size: u64) -> RangeAsk {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return RangeAsk::Whole;
    };
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAsk::Whole;
    };
    if spec.contains(',') {
        return RangeAsk::Whole;
    }
    let number = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim(), last.trim()) {
        ("", suffix) => match number(suffix) {
            Some(0) => RangeAsk::Unsatisfiable,
            Some(_) if size == 0 => RangeAsk::Unsatisfiable,
            Some(n) => RangeAsk::Part {
                start: size.saturating_sub(n),
                end: size - 1,
            },
            None => RangeAsk::Whole,
        },
        (from, to) => {
            let Some(start) = number(from) else {
                return RangeAsk::Whole;
            };
            let end = if to.is_empty() {
                Some(u64::MAX)
            } else {
                number(to)
            };
            match end {
                Some(end) if end >= start => {
                    if start >= size {
                        RangeAsk::Unsatisfiable
                    } else {
                        RangeAsk::Part {
                            start,
                            end: end.min(size - 1),
                        }
                    }
                }
                _ => RangeAsk::Whole,
            }
        }
    }
}

/// Access to the legacy unauthenticated download and thumbnail: refused (404) while
/// `freeze_legacy_media` is on.
struct Unfrozen;

impl FromRequestParts<Arc<Services>> for Unfrozen {
    type Rejection = Error;

    async fn from_request_parts(
        _parts: &mut http::request::Parts,
        s: &Arc<Services>,
    ) -> Result<Self> {
        if s.config.freeze_legacy_media {
            return Err(frozen());
        }
        Ok(Unfrozen)
    }
}

/// Unauthenticated media access is frozen: every media is "after the freeze".
fn frozen() -> Error {
    Error::not_found(
        "Media is only served by the authenticated endpoints (/_matrix/client/v1/media)",
    )
}

/// Another server's media is fetched (once) before it is served like ours.
async fn fetch_if_remote(s: &Services, p: &Segs, requester: &str) -> Result<()> {
    let server = p.get(0)?;
    if server == s.globals.server_name.as_str() {
        return Ok(());
    }
    let server =
        ruma::ServerName::parse(server).map_err(|_| Error::not_found("Media not found"))?;
    crate::service::federation::media::remote_file(s, &server, p.get(1)?, requester).await?;
    Ok(())
}

async fn serve_download(
    s: &Services,
    p: &Segs,
    q: &Option<String>,
    range: Option<String>,
) -> Result<Response> {
    let file: FileInfo = s.media.file(p.get(0)?, p.get(1)?, timeout(q)?).await?;
    let content_type = file
        .content_type
        .clone()
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    let filename = match p.0.get(2) {
        Some(name) => Some(name.clone()),
        None => file.filename.clone(),
    };
    let disposition = if is_inline(&content_type) {
        ContentDispositionType::Inline
    } else {
        ContentDispositionType::Attachment
    };
    stream_file(
        s,
        &file.sha256,
        file.size,
        &content_type,
        ContentDisposition::new(disposition).with_filename(filename),
        range.as_deref(),
    )
    .await
}

async fn serve_thumbnail(
    s: &Services,
    p: &Segs,
    q: &Option<String>,
    range: Option<String>,
    requester: &str,
) -> Result<Response> {
    let dimension = |key: &str| -> Result<u32> {
        query_param(q, key)?
            .ok_or_else(|| Error::new(ErrCode::MissingParam, format!("{key} is required")))?
            .parse::<u32>()
            .map_err(|_| Error::invalid_param(format!("{key} must be a positive integer")))
    };
    let (width, height) = (dimension("width")?, dimension("height")?);
    let method = Method::parse(query_param(q, "method")?.as_deref())?;
    // Animated thumbnails are not made: `animated=true` is answered as `false`, as the spec
    // allows for servers without animation support.
    match query_param(q, "animated")?.as_deref() {
        None | Some("true") | Some("false") => {}
        Some(_) => return Err(Error::invalid_param("animated must be true or false")),
    }
    fetch_if_remote(s, p, requester).await?;
    let thumb = s
        .media
        .thumbnail(p.get(0)?, p.get(1)?, width, height, method, timeout(q)?)
        .await?;
    let extension = if thumb.content_type == "image/jpeg" {
        "jpg"
    } else {
        "png"
    };
    stream_file(
        s,
        &thumb.sha256,
        thumb.size,
        &thumb.content_type,
        ContentDisposition::new(ContentDispositionType::Inline)
            .with_filename(Some(format!("thumbnail.{extension}"))),
        range.as_deref(),
    )
    .await
}

/// A stored file as the response body, read from disk (and decrypted) as it is sent; a single
/// byte range when the client asks for one (206, or 416 outside the file).
async fn stream_file(
    s: &Services,
    sha256: &str,
    size: u64,
    content_type: &str,
    disposition: ContentDisposition,
    range: Option<&str>,
) -> Result<Response> {
    let (status, start, len) = match parse_range(range, size) {
        RangeAsk::Whole => (StatusCode::OK, 0, size),
        RangeAsk::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        RangeAsk::Unsatisfiable => {
            let body = Json(json!({
                "errcode": "M_UNKNOWN",
                "error": "The requested range is not within the file",
            }));
            let mut res = (StatusCode::RANGE_NOT_SATISFIABLE, body).into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                res.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(res);
        }
    };
    let body = Body::from_stream(s.media.files().open_range(sha256, start, len).await?);
    let mut res = (status, body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + len - 1)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&disposition.to_string()) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("cross-origin"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=31536000, immutable"),
    );
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_as_rfc_9110_says() {
        let p = |v: &str, size| parse_range(Some(v), size);
        assert_eq!(p("bytes=0-9", 100), RangeAsk::Part { start: 0, end: 9 });
        assert_eq!(p("bytes=90-", 100), RangeAsk::Part { start: 90, end: 99 });
        assert_eq!(
            p("bytes=90-500", 100),
            RangeAsk::Part { start: 90, end: 99 }
        );
        assert_eq!(p("bytes=-10", 100), RangeAsk::Part { start: 90, end: 99 });
        assert_eq!(p("bytes=-500", 100), RangeAsk::Part { start: 0, end: 99 });
        assert_eq!(p("bytes=100-", 100), RangeAsk::Unsatisfiable);
        assert_eq!(p("bytes=-0", 100), RangeAsk::Unsatisfiable);
        assert_eq!(p("bytes=0-", 0), RangeAsk::Unsatisfiable);
        assert_eq!(p("bytes=5-2", 100), RangeAsk::Whole);
        assert_eq!(p("bytes=0-1,5-6", 100), RangeAsk::Whole);
        assert_eq!(p("items=0-1", 100), RangeAsk::Whole);
        assert_eq!(p("bytes=a-b", 100), RangeAsk::Whole);
        assert_eq!(parse_range(None, 100), RangeAsk::Whole);
    }

    #[test]
    fn only_safe_types_are_inline() {
        assert!(is_inline("image/png"));
        assert!(is_inline("text/plain; charset=utf-8"));
        assert!(is_inline("IMAGE/JPEG"));
        assert!(!is_inline("text/html"));
        assert!(!is_inline("image/svg+xml"));
        assert!(!is_inline("application/octet-stream"));
        assert!(!is_inline("application/pdf"));
    }

    #[test]
    fn disposition_encodes_names() {
        let d = ContentDisposition::new(ContentDispositionType::Attachment)
            .with_filename(Some("Grüße.txt".into()));
        assert_eq!(
            d.to_string(),
            "attachment; filename*=utf-8''Gr%C3%BC%C3%9Fe.txt"
        );
        let d = ContentDisposition::new(ContentDispositionType::Inline)
            .with_filename(Some("my file.png".into()));
        assert_eq!(d.to_string(), "inline; filename=\"my file.png\"");
    }
}

/// Property tests: any `Range` header is answered without panic, never with bytes outside the
/// file, and a well-formed range of the file is served as asked.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, text};

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn fuzz_range_headers(
            value in prop_oneof![
                text(),
                " ?bytes= ?[0-9]{0,21} ?- ?[0-9]{0,21}(,[0-9]{0,3}-[0-9]{0,3})?",
            ],
            size in prop_oneof![Just(0u64), Just(1u64), any::<u64>(), 0u64..10_000],
            a in any::<u64>(),
            b in any::<u64>(),
        ) {
            if let RangeAsk::Part { start, end } = parse_range(Some(&value), size) {
                prop_assert!(start <= end && end < size);
            }
            let (a, b) = (a.min(b), a.max(b));
            match parse_range(Some(&format!("bytes={a}-{b}")), size) {
                RangeAsk::Part { start, end } => {
                    prop_assert_eq!((start, end), (a, b.min(size - 1)));
                }
                RangeAsk::Unsatisfiable => prop_assert!(a >= size),
                RangeAsk::Whole => prop_assert!(false, "a well-formed range"),
            }
            if b > 0 && size > 0 {
                prop_assert_eq!(
                    parse_range(Some(&format!("bytes=-{b}")), size),
                    RangeAsk::Part { start: size.saturating_sub(b), end: size - 1 }
                );
            }
        }
    }
}
