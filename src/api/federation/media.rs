//! Authenticated media for other servers: `GET /media/download/{mediaId}` and
//! `/media/thumbnail/{mediaId}`, answered as `multipart/mixed` (metadata, then the content),
//! the content streamed from the media store (and decrypted) as it is sent, never held whole.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Path, RawQuery, State},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};

use super::Signed;
use crate::{
    api::client::{media::timeout, query_param},
    error::{ErrCode, Error, Result},
    service::{federation::media::multipart_frame, media::thumbnail::Method, Services},
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    r.route(
        "/_matrix/federation/v1/media/download/{media_id}",
        get(download),
    )
    .route(
        "/_matrix/federation/v1/media/thumbnail/{media_id}",
        get(thumbnail),
    )
}

async fn multipart(
    s: &Services,
    sha256: &str,
    size: u64,
    content_type: &str,
    disposition: &str,
) -> Result<Response> {
    use futures_util::StreamExt;
    let (ct, head, tail) = multipart_frame(content_type, disposition);
    let length = head.len() as u64 + size + tail.len() as u64;
    let content = s.media.files().open_stream(sha256).await?;
    let body = futures_util::stream::once(async move { Ok(bytes::Bytes::from(head)) })
        .chain(content)
        .chain(futures_util::stream::once(async move {
            Ok(bytes::Bytes::from(tail))
        }));
    let mut res = (StatusCode::OK, Body::from_stream(body)).into_response();
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&ct) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    Ok(res)
}

async fn download(
    State(s): State<Arc<Services>>,
    Path(media_id): Path<String>,
    RawQuery(q): RawQuery,
    _signed: Signed,
) -> Result<Response> {
    let own = s.globals.server_name.to_string();
    let file = s.media.file(&own, &media_id, timeout(&q)?).await?;
    let content_type = file
        .content_type
        .clone()
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    let disposition = match &file.filename {
        Some(name) => format!(
            "attachment; filename=\"{}\"",
            name.replace(['"', '\\'], "_")
        ),
        None => "attachment".to_owned(),
    };
    multipart(&s, &file.sha256, file.size, &content_type, &disposition).await
}

async fn thumbnail(
    State(s): State<Arc<Services>>,
    Path(media_id): Path<String>,
    RawQuery(q): RawQuery,
    _signed: Signed,
) -> Result<Response> {
    let dimension = |key: &str| -> Result<u32> {
        query_param(&q, key)?
            .ok_or_else(|| Error::new(ErrCode::MissingParam, format!("{key} is required")))?
            .parse::<u32>()
            .map_err(|_| Error::invalid_param(format!("{key} must be a positive integer")))
    };
    let (width, height) = (dimension("width")?, dimension("height")?);
    let method = Method::parse(query_param(&q, "method")?.as_deref())?;
    let own = s.globals.server_name.to_string();
    let thumb = s
        .media
        .thumbnail(&own, &media_id, width, height, method, timeout(&q)?)
        .await?;
    multipart(&s, &thumb.sha256, thumb.size, &thumb.content_type, "inline").await
}
